"""Weight-only int8/int4 quantization while loading: the quantizer (``quantize``), its
CPU int8 kernel (``int8_kernel``), the on-disk quantized cache (``cache``) and per-shard
quantization under tensor parallelism (``sharded``)."""
