"""gptstack: make a GPT assistant the way the field does, end to end, small enough to read."""

__version__ = "0.1.0"
