"""The shipped demo model: a tiny Llama that counts in English words.

Made by ``tools/make_demo.py``; stored in the HF layout (config.json,
model.safetensors, sentencepiece tokenizer.model) so the demo exercises conversion.
"""

import pathlib


def demo_dir() -> pathlib.Path:
    return pathlib.Path(__file__).parent
