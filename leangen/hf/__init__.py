"""A Hugging Face model folder: ``config.json`` parsed (``config``), the torchtune builder it
needs (``families``, with the ``builders`` torchtune lacks), the check of any other builder
against it (``check``), the ``tokenizer.json`` tokenizer and the folder's chat template."""
