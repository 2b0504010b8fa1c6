"""Triton kernels, one file per op (imported lazily: set TRITON_INTERPRET=1 before importing to run on CPU)."""
