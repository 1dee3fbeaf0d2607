"""Training: one loop (loop.py) shared by every stage; each stage supplies batches and a loss."""
