"""Tiny synthetic shapes world, tokenizer and image processor for CPU-scale Metis-HOME training."""
