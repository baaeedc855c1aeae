"""Opt-in custom kernels, outside the default path: the AVX-512 bfloat16 ops (--project-bfloat16-kernels)."""
