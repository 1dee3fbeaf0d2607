"""Models: the GPT, scalar heads, adapters, quantization."""
