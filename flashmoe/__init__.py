"""flashmoe: run MLX Mixture-of-Experts models larger than RAM by streaming experts from SSD."""

__version__ = "0.1.0"
