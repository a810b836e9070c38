"""What only the two recipes need: the command line and its config (``cli``), model and
tokenizer from a config (``components``), result files (``outputs``) and run figures
(``metrics``). Library code never reads a ``DictConfig``; this package does."""
