"""Data: corpora, token shards, batch loaders, chat and preference formats, synthetic tasks."""
