"""Files that never load half: atomic writes, safetensors weights, checkpoint ids, whole-checkpoint commits.

The bottom of the package (only errors.py is lower): model/, runs.py, train/, infer/ and eval/ all write
through here, so there is one implementation of "write to a temp name, fsync, rename" and one commit protocol.

A checkpoint is several files and directories, and it is committed as a whole (`commit_checkpoint`): a
kill at any moment, also mid-save, leaves the previous checkpoint or the new one, never a mix. A random
checkpoint id also goes into the safetensors metadata, optimizer.pt and trainer_state.json, so a mix made
some other way (files copied between runs, a run saved by an older version killed between renames) is
reported on load instead of loading a half-updated checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, default=str).encode())


# ---- one checkpoint, committed as a whole ------------------------------------------------------------------
#
# Each rename is atomic, but a checkpoint is many files, and a kill between two renames used to leave new
# weights beside old trainer state (or, in the first save, weights and no trainer state at all). So a
# checkpoint is committed like a tiny database transaction:
#
#   1. every file and directory is written under its final name into RUN/.staging-XXXX/ (same file system)
#      and fsynced;
#   2. the journal RUN/.commit.json, naming the staging directory and its entries, is written atomically:
#      its appearance is the commit point;
#   3. each entry is renamed into place, trainer_state.json last (a directory cannot replace a non-empty
#      one in one rename: the old one is first moved aside into RUN/.staging-XXXX.old/);
#   4. the journal is removed, then the staging leftovers.
#
# Whoever opens the run next calls `recover_run` (every load path and `train` do): it finishes the renames
# of a journal it finds (they are idempotent) and removes staging directories that have none, so what a
# reader sees is the old checkpoint or the new one. A commit holds an flock on the run directory, and
# recovery takes it too, so a reader never "recovers" a commit that is still in progress.

JOURNAL = ".commit.json"
STAGING_PREFIX = ".staging-"
# temp files the per-file atomic writes of earlier versions could leave behind when killed
_STRAY_TMP = {n + ".tmp" for n in (JOURNAL, "model.safetensors", "config.json", "optimizer.pt", "rng.pt",
                                     "trainer_state.json", "head.safetensors", "value_head.safetensors")}
# commits and journal recoveries done by this process: what GPTSTACK_FAULT_KILL's @K counts (a test hook)
_FAULT_COUNTS = {"commit": 0, "recover": 0}


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _fault_point(point: str) -> None:
    """Test hook for kill tests: GPTSTACK_FAULT_KILL=POINT[@K] SIGKILLs this process when it reaches POINT
    in its K-th commit (default 1): `staged` (files written, no journal yet), `commit:N` (journal written,
    N renames done), `done` (committed), or `recover:N` (N renames into its K-th journal recovery).
    Unset, it costs one environment lookup."""
    spec = os.environ.get("GPTSTACK_FAULT_KILL")
    if not spec:
        return
    want, _, k = spec.partition("@")
    if want == point and int(k or 1) == _FAULT_COUNTS["recover" if point.startswith("recover") else "commit"]:
        _kill()


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # e.g. Windows, where directories cannot be opened: renames there are durable anyway
        return
    try:
        os.fsync(fd)
    except OSError:   # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (writers that fsynced already cost nothing more)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


@contextlib.contextmanager
def _locked(run: Path) -> Iterator[None]:
    """An exclusive flock on the run directory itself (no lock file to leave behind); the kernel drops it
    when the holder dies, even by SIGKILL."""
    try:
        import fcntl
    except ImportError:   # Windows: commits and recoveries are not guarded against each other
        fcntl = None
    fd = os.open(run, os.O_RDONLY) if fcntl else None
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _apply(run: Path, staging: Path, names: list[str], phase: str) -> None:
    """Rename each staged entry into place, skipping those already moved, so that running it again after a
    kill finishes the job."""
    renames = 0
    for name in names:
        src, dst = staging / name, run / name
        if not os.path.lexists(src):
            continue
        if os.path.lexists(dst) and (src.is_dir() or dst.is_dir()):
            old = staging.with_name(staging.name + ".old")
            old.mkdir(exist_ok=True)
            os.replace(dst, old / name)
            renames += 1
            _fault_point(f"{phase}:{renames}")
        os.replace(src, dst)
        renames += 1
        _fault_point(f"{phase}:{renames}")


def _recover_locked(run: Path) -> None:
    journal = run / JOURNAL
    if journal.exists():
        try:
            entry = json.loads(journal.read_text())
            staging, names = run / entry["staging"], list(entry["entries"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"'{journal}' is corrupt, so a checkpoint commit in '{run}' cannot be finished; "
                                  "restore a backup or retrain") from None
        _FAULT_COUNTS["recover"] += 1
        _apply(run, staging, names, "recover")
        _fsync_dir(run)
        journal.unlink()
        _fsync_dir(run)
    for name in os.listdir(run):
        try:
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(run / name)
            elif name in _STRAY_TMP:
                (run / name).unlink()
        except OSError:   # best effort: leftovers without a journal are never read
            pass


def _has_leftovers(run: Path) -> bool:
    try:
        names = os.listdir(run)
    except OSError:   # missing, not a directory, unreadable: the loaders say so
        return False
    return any(n == JOURNAL or n.startswith(STAGING_PREFIX) or n in _STRAY_TMP for n in names)


def recover_run(run_dir: str | os.PathLike) -> None:
    """Finish or clear what a killed save left in `run_dir` (see above): roll a journaled commit forward,
    remove staging directories without a journal and stray temp files. One directory listing (no lock,
    no writes) when there is nothing to do, so every load path calls it; a commit in progress in another
    process is waited for."""
    run = Path(run_dir)
    if not _has_leftovers(run):
        return
    try:
        with _locked(run):
            _recover_locked(run)
    except OSError as e:
        raise CheckpointError(f"'{run}' holds an unfinished checkpoint save that cannot be completed ({e}); "
                              "make the directory writable and load it again") from None


@contextlib.contextmanager
def commit_checkpoint(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Stage a checkpoint and commit it into `run_dir` as a whole:

        with commit_checkpoint(out) as tmp:
            save_weights(tmp / "model.safetensors", ...)
            tokenizer.save(tmp / "tokenizer")
            atomic_write_json(tmp / "trainer_state.json", state)

    Whatever is written under `tmp` replaces the entries of the same names in `run_dir` (others are left
    alone). An exception inside the block discards the staged files; a kill leaves the old checkpoint, or
    (once the journal is written) the new one after `recover_run`."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with _locked(run):
        _recover_locked(run)                  # a commit killed earlier is finished before a new one starts
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=run))
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _FAULT_COUNTS["commit"] += 1
        names = sorted(os.listdir(staging), key=lambda n: (n == "trainer_state.json", n))
        _fsync_tree(staging)
        _fault_point("staged")
        atomic_write_json(run / JOURNAL, {"staging": staging.name, "entries": names})
        _fsync_dir(run)
        _fault_point("commit:0")
        _apply(run, staging, names, "commit")
        _fsync_dir(run)
        (run / JOURNAL).unlink()
        _fsync_dir(run)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + ".old"), ignore_errors=True)
    _fault_point("done")


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds a committed training checkpoint (trainer_state.json, after recovery)."""
    recover_run(run_dir)
    return (Path(run_dir) / "trainer_state.json").exists()


def new_checkpoint_id() -> str:
    return secrets.token_hex(8)



def check_same_save(run: str | os.PathLike, meta: dict, what: str = "weights") -> None:
    """Weights (or an adapter) and trainer_state.json in `run` must carry the same checkpoint id."""
    state_path = Path(run) / "trainer_state.json"
    if not state_path.exists():
        return
    cid = read_json(state_path).get("checkpoint_id")
    if cid and meta.get("checkpoint_id") and cid != meta["checkpoint_id"]:
        raise CheckpointError(f"'{run}' holds {what} and trainer state from different saves "
                              "(the run was killed mid-save); restore a backup or retrain")


def read_json(path: str | os.PathLike, what: str = "") -> dict:
    """A JSON file that must parse: a corrupt one is a one-line CheckpointError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}'{' (' + what + ')' if what else ''} is corrupt ({e.msg})") from None


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    # Tied weights share storage, which safetensors refuses; each tensor is stored once, contiguous.
    seen, tensors = set(), {}
    for k, v in state.items():
        if v.data_ptr() in seen and k == "lm_head.weight":
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().to("cpu").contiguous()
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' is missing: the run directory holds no weights (did the run finish?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for truncation and garbage
        raise CheckpointError(f"'{path}' is corrupt or truncated ({str(e).splitlines()[0]})") from None


