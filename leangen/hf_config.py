"""The builders' old dotted path, kept so that YAMLs written as
``_component_: leangen.hf_config.gemma2`` keep working. The code is in ``leangen.hf.builders``."""

from leangen.hf.builders import gemma2, llama2_tied

__all__ = ["gemma2", "llama2_tied"]
