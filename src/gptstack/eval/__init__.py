"""Evaluation: bits per byte, task accuracy, diversity, the pipeline report."""
