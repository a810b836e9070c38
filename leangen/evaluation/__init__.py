"""Scoring a loaded model: sliding-window perplexity (``perplexity``) and
lm-evaluation-harness through an offline adapter (``lm_eval_adapter``, ``lm_eval_tasks``)."""
