"""Running a model: the engine (encode, prompt, decode), precision and threads, the volume loop, the
embedding cache, process settings (heap, OpenMP)."""
