"""Every user-facing failure is a GptstackError: the CLI prints its message on one line and exits 2.

Messages say what was wrong and what to do about it. Subclasses let library callers catch one kind.
"""


class GptstackError(Exception):
    """Base class. `str(err)` is the one line the user sees."""

    exit_code = 2


class DataError(GptstackError):
    """Missing, empty, unreadable or malformed input data (corpus, JSONL, preference pairs)."""


class CheckpointError(GptstackError):
    """A run directory that is not one, or a corrupt, truncated or mismatched checkpoint."""


class ConfigError(GptstackError):
    """Flags or config values that cannot work together."""


class PromptError(GptstackError):
    """A prompt that cannot be generated from: empty, or longer than the model's context."""


class DependencyError(GptstackError):
    """An optional dependency (peft, bitsandbytes, sentence-transformers, ...) is missing or cannot run here."""


class ToolError(GptstackError):
    """A tool call that cannot run: bad arguments or syntax, division by zero, a result too large."""


def require(condition: bool, error: type[GptstackError], message: str) -> None:
    """Raise `error(message)` unless `condition` holds; keeps validation one line per rule."""
    if not condition:
        raise error(message)


class Interrupted(GptstackError):
    """Ctrl-C: the work so far is saved; the same command continues it."""

    exit_code = 130
