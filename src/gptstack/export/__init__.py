"""Writing runs out: Hugging Face directories (hf.py) and GGUF files (gguf.py)."""
