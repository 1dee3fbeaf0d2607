"""Inference: the engine and what builds on it (sampling, constraints, ensembles, retrieval, mixing)."""
