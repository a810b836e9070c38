"""torchrun: this process's rank and process group (``ranks``), and tensor parallelism
where each rank maps only its own slice of the checkpoint (``tensor_parallel``)."""
