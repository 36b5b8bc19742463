"""Number formats: GGUF block formats and FP8 (e4m3 fnuz) scales."""
