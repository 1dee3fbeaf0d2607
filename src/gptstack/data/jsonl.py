"""Reading JSONL the one way every loader shares: blank lines skipped, errors name FILE:LINE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; DataError naming the line when one is not JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({e.strerror})") from None
