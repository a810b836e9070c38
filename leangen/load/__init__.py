"""``load_model`` and its stages, in pipeline order: build on meta (``pipeline``), match
the stored q/k layout (``rope``), assign mmap'd tensors, materialise buffers
(``buffers``), move and cast tensor by tensor (``move``), optionally prepack (``prepack``)."""
