"""Dataset cartography (Swayamdipta et al. 2020): where each training conversation sits by its training dynamics.

    rec = CartographyRecorder(conversations, labels)     # SFT feeds it from the loss it already computes
    rec.record(indices, confidence, exact, token_accuracy)
    rec.write(RUN / "cartography.jsonl", meta)
    header, records = read_cartography(path)
    points, info = cartography_points(header, records)    # -> datamap.write_cartography_map
    scores = confidences_for(conversations, path)         # for --order easy-first / hard-first

Every time SFT trains on a conversation, the forward pass that computes its loss (before the update of that
step) gives, for free, the conversation's mean log-probability of its gold assistant tokens. One visit's
*confidence* is exp(that mean): the per-token-normalised probability of the gold reply, the sequence analogue
of the paper's p(y* | x), and exactly exp(-loss) of that conversation. Over the epochs:

    confidence   = mean over visits          variability = std over visits (population std, as in the paper)
    correctness  = fraction of visits in which every gold token was the model's argmax (teacher-forced)

Regions (the paper highlights thirds of the data; here every point gets one name): the third with the highest
variability is *ambiguous*; of the rest, those at or above the median confidence are *easy-to-learn*, those
below *hard-to-learn*. Variability needs at least two visits.

A file is tied to its data set by content: each conversation's id is a hash of its messages, and the header
carries a fingerprint of the sorted ids, so a curriculum read from it refuses any other data set.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .datamap import conversation_text

FORMAT = "gptstack-cartography/1"
REGIONS = ("easy-to-learn", "ambiguous", "hard-to-learn")
_TEXT_CHARS = 400   # what the map's hover shows of each conversation


def conversation_id(messages: Sequence[dict]) -> str:
    blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_fingerprint(ids: Sequence[str]) -> str:
    """Order-free: the same conversations in another order (another seed's shuffle) are the same data set."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _sig(x) -> float:
    """7 significant digits: what float32 training gives, at any magnitude (confidences reach 1e-5)."""
    return float(f"{float(x):.7g}")


def _summary(visits: list[list[float]]) -> dict:
    if not visits:
        return {"confidence": None, "variability": None, "correctness": None, "token_accuracy": None}
    conf = [v[0] for v in visits]
    mean = sum(conf) / len(conf)
    var = sum((c - mean) ** 2 for c in conf) / len(conf)
    return {"confidence": mean, "variability": math.sqrt(var),
            "correctness": sum(v[1] for v in visits) / len(visits),
            "token_accuracy": sum(v[2] for v in visits) / len(visits)}


class CartographyRecorder:
    """Per-conversation visits (confidence, exact, token accuracy), indexed by position in the run's training
    list (the data set in file order without the held-out conversations, before any curriculum). Its state
    is checkpointed with the run, so a resumed run records exactly what an uninterrupted one does."""

    def __init__(self, conversations: Sequence[Sequence[dict]], labels: Sequence[str]):
        self.ids = [conversation_id(c) for c in conversations]
        self.fingerprint = data_fingerprint(self.ids)
        self.labels = list(labels)
        self.texts = [conversation_text(c)[:_TEXT_CHARS] for c in conversations]
        self.visits: list[list[list[float]]] = [[] for _ in conversations]

    def record(self, indices: Sequence[int], confidence: Sequence[float], exact: Sequence[float],
               token_accuracy: Sequence[float]) -> None:
        for i, c, e, a in zip(indices, confidence, exact, token_accuracy):
            self.visits[int(i)].append([_sig(c), float(e), _sig(a)])

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "visits": self.visits}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint or len(state.get("visits", ())) != len(self.visits):
            raise DataError("cannot resume the cartography record: the run's checkpoint recorded another data set "
                            "(resume with the same --data, --tasks, --examples-per-task and --seed)")
        self.visits = [[list(v) for v in vs] for vs in state["visits"]]

    def records(self) -> list[dict]:
        return [{"index": i, "id": self.ids[i], "label": self.labels[i], "epochs": len(vs), **_summary(vs),
                 "confidences": [v[0] for v in vs], "text": self.texts[i]} for i, vs in enumerate(self.visits)]

    def write(self, path: Path, meta: dict) -> None:
        from ..io import atomic_write_bytes

        header = {"format": FORMAT, "n": len(self.ids), "fingerprint": self.fingerprint, **meta}
        lines = [json.dumps(header)] + [json.dumps(r) for r in self.records()]
        atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def resolve_cartography_path(spec: str | Path) -> Path:
    """A cartography.jsonl file, or a run directory holding one."""
    path = Path(spec)
    if path.is_dir():
        path = path / "cartography.jsonl"
        if not path.is_file():
            raise DataError(f"'{spec}' holds no cartography.jsonl: train it with 'gptstack sft --cartography'")
    elif not path.is_file():
        raise DataError(f"cartography file '{spec}' does not exist (give a run directory trained with "
                        "--cartography, or its cartography.jsonl)")
    return path


def read_cartography(spec: str | Path) -> tuple[dict, list[dict]]:
    """(header, records in data-set order); a DataError naming FILE:LINE for anything malformed."""
    from .jsonl import iter_jsonl

    path = resolve_cartography_path(spec)
    rows = list(iter_jsonl(path))
    if not rows or not isinstance(rows[0][1], dict) or rows[0][1].get("format") != FORMAT:
        raise DataError(f"{path}:1: not a cartography file (its first line must be a {FORMAT} header)")
    header = rows[0][1]
    records = []
    for lineno, rec in rows[1:]:
        if not isinstance(rec, dict) or not {"index", "id", "epochs", "confidence"} <= set(rec):
            raise DataError(f"{path}:{lineno}: a cartography record needs index, id, epochs and confidence")
        if rec["index"] != len(records):
            raise DataError(f"{path}:{lineno}: record index {rec['index']} is out of order (expected {len(records)})")
        records.append(rec)
    if len(records) != header.get("n"):
        raise DataError(f"{path}: the header says {header.get('n')} conversations but the file holds "
                        f"{len(records)} records (a truncated file?)")
    return header, records


def confidences_for(conversations: Sequence[Sequence[dict]], spec: str | Path) -> list[float | None]:
    """Each conversation's recorded confidence (None: never trained on in the recording run, e.g. skipped as
    too long), matched by content, so the recording run's shuffle does not matter; any other data set is a
    DataError."""
    header, records = read_cartography(spec)
    ids = [conversation_id(c) for c in conversations]
    fp = data_fingerprint(ids)
    if header.get("fingerprint") != fp or len(records) != len(ids):
        missing = len(set(ids) - {r["id"] for r in records})
        raise DataError(f"cartography '{spec}' was recorded on a different data set ({len(records)} conversations, "
                        f"fingerprint {header.get('fingerprint')}; this run has {len(ids)}, fingerprint {fp}, "
                        f"{missing} of them not in the file): record it on this data with --cartography")
    by_id: dict[str, list] = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r["confidence"] if r["epochs"] else None)
    return [by_id[i].pop() for i in ids]


def assign_regions(confidence: Sequence[float], variability: Sequence[float]) -> list[str]:
    """easy-to-learn / ambiguous / hard-to-learn for each point (the rule in the module docstring)."""
    n = len(confidence)
    if n == 0:
        return []
    by_var = sorted(range(n), key=lambda i: (-variability[i], i))
    ambiguous = {i for i in by_var[: n // 3] if variability[i] > 0}
    rest = sorted(confidence[i] for i in range(n) if i not in ambiguous)
    median = rest[len(rest) // 2] if rest else 0.0
    return ["ambiguous" if i in ambiguous else "easy-to-learn" if confidence[i] >= median else "hard-to-learn"
            for i in range(n)]


def cartography_points(header: dict, records: Sequence[dict]) -> tuple[list[dict], dict]:
    """The map's points (x = variability, y = confidence, a region each) from a cartography file's records;
    conversations never trained on are left off (counted in info). Variability needs two visits."""
    seen = [r for r in records if r["epochs"] > 0]
    if len(seen) < 3:
        raise DataError(f"the cartography record has {len(seen)} conversations trained on; a map needs at least 3")
    most = max(r["epochs"] for r in seen)
    if most < 2:
        raise DataError("variability needs at least two visits per conversation, and this run trained on each "
                        "at most once: record a run of two or more epochs (raise --steps)")
    regions = assign_regions([r["confidence"] for r in seen], [r["variability"] for r in seen])
    points = [{"index": r["index"], "x": r["variability"], "y": r["confidence"], "label": r.get("label", ""),
               "region": reg, "text": r.get("text", ""), "confidence": r["confidence"],
               "variability": r["variability"], "correctness": r.get("correctness") or 0.0, "epochs": r["epochs"]}
              for r, reg in zip(seen, regions)]
    counts = {reg: regions.count(reg) for reg in REGIONS}
    amb = [p["variability"] for p in points if p["region"] == "ambiguous"]
    rest = sorted(p["confidence"] for p in points if p["region"] != "ambiguous")
    info = {"n": len(points), "unseen": len(records) - len(seen), "labels": sorted({p["label"] for p in points}),
            "regions": counts, "epochs_max": most, "epochs_min": min(r["epochs"] for r in seen),
            "variability_cut": min(amb) if amb else None,
            "confidence_cut": rest[len(rest) // 2] if rest else None,   # assign_regions' median
            "data": header.get("data", "")}
    return points, info
