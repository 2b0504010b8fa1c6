"""sslscale: distributed self-supervised pretraining with fused Triton and C++/CUDA kernels."""

__version__ = "0.1.0"
