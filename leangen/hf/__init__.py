"""A Hugging Face model folder: ``config.json`` to a builder (and a check of any other
builder), the ``tokenizer.json`` tokenizer, and the folder's chat template."""
