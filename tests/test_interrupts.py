"""kill -9 at any moment (mid-training, mid-checkpoint-write, mid-pipeline), then the same command again: it
completes, never loads a half-written checkpoint, and, where resume is exact, ends with the weights of the
uninterrupted run.

Deterministic kill points come from the fault hook of io.py: GPTSTACK_FAULT_KILL=POINT[@K]
SIGKILLs the process at POINT of its K-th checkpoint commit (`staged`, `commit:N` after N renames, `done`).
Timed kills land at seeded random moments. The killed runs are real `gptstack` subprocesses; the reruns are
the same command through the CLI's main() in this process (it saves a torch start-up per rerun)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptstack.cli import main
from gptstack import io as checkpoint
from gptstack.io import JOURNAL, STAGING_PREFIX, commit_checkpoint, recover_run
from gptstack.runs import load_model

TINY = ["--vocab-size", "320", "--depth", "1", "--n-embd", "64", "--seq-len", "32", "--batch-size", "4",
        "--total-batch-tokens", "0", "--minutes", "0", "--eval-every", "100", "--eval-tokens", "256",
        "--log-every", "1", "--no-progress", "--dtype", "fp32", "--threads", "1"]


def _pretrain_argv(corpus_dir, out, steps: int, save_every: int) -> list[str]:
    return ["pretrain", "--corpus", str(corpus_dir), "--out", str(out), "--steps", str(steps),
            "--save-every", str(save_every)] + TINY


def _spawn(argv: list[str], log: Path, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)   # GPTSTACK_HOME etc. from conftest: the same caches as this process
    env.pop("GPTSTACK_FAULT_KILL", None)
    if fault:
        env["GPTSTACK_FAULT_KILL"] = fault
    with open(log, "w") as f:   # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "gptstack.cli"] + argv, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _losses_so_far(metrics: Path) -> list[str]:
    return [line for line in metrics.read_text().splitlines() if '"loss"' in line]


def _state(run: Path) -> dict:
    return json.loads((run / "trainer_state.json").read_text())


def _leftovers(run: Path) -> list[str]:
    return [n for n in os.listdir(run) if n == JOURNAL or n.startswith(STAGING_PREFIX) or n.endswith(".tmp")]


def _assert_same_run(run: Path, ref: Path) -> None:
    """What tests/test_loop.py asserts for resume equivalence: the same losses and the same final weights."""
    assert _state(run)["finished"] and _state(run)["step"] == _state(ref)["step"]
    assert np.allclose(_losses(run), _losses(ref), atol=1e-6)
    a, b = load_model(run)[0], load_model(ref)[0]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert not _leftovers(run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir):
    """Uninterrupted runs, one per (steps, save_every), made on first use."""
    runs = {}

    def get(steps: int, save_every: int) -> Path:
        if (steps, save_every) not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            assert main(_pretrain_argv(corpus_dir, out, steps, save_every)) == 0
            runs[steps, save_every] = out
        return runs[steps, save_every]

    return get


# ---- the commit itself, at every point (in process: the kill is simulated by an exception no handler catches)

class Killed(BaseException):
    pass


def _kill():
    raise Killed


def _write_checkpoint(tmp: Path, tag: str) -> None:
    for name in ("model.safetensors", "config.json", "trainer_state.json"):
        (tmp / name).write_text(tag)
    for d in ("tokenizer", "adapter"):
        (tmp / d).mkdir()
        (tmp / d / "files.json").write_text(tag)


def _tags(run: Path) -> set[str]:
    paths = [run / n for n in ("model.safetensors", "config.json", "trainer_state.json")]
    paths += [run / d / "files.json" for d in ("tokenizer", "adapter")]
    return {p.read_text() if p.exists() else "missing" for p in paths}


# a second commit over a first: 3 file renames, 2 per directory (the old one is moved aside first)
RENAMES = 3 + 2 * 2


def test_every_kill_point_of_a_commit_leaves_the_old_checkpoint_or_the_new_one(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_kill", _kill)
    for name in ("_fsync_dir", "_fsync_tree"):   # durability is not what this test is about, and it is slow
        monkeypatch.setattr(checkpoint, name, lambda path: None)
    points = ["staged"] + [f"commit:{n}" for n in range(RENAMES + 1)] + ["done"]
    for i, point in enumerate(points):
        left = RENAMES - int(point.split(":")[1]) if point.startswith("commit") else 0   # renames still to do
        # ... and a kill in the recovery that follows, after each of its renames, then a recovery that finishes
        for j in range(left + 1):
            run = tmp_path / f"run{i}-{j}"
            monkeypatch.setattr(checkpoint, "_FAULT_COUNTS", {"commit": 0, "recover": 0})
            monkeypatch.delenv("GPTSTACK_FAULT_KILL", raising=False)
            with commit_checkpoint(run) as tmp:
                _write_checkpoint(tmp, "old")
            monkeypatch.setenv("GPTSTACK_FAULT_KILL", f"{point}@2")
            with pytest.raises(Killed):
                with commit_checkpoint(run) as tmp:
                    _write_checkpoint(tmp, "new")
            assert (run / JOURNAL).exists() == point.startswith("commit"), point
            if j:
                monkeypatch.setenv("GPTSTACK_FAULT_KILL", f"recover:{j}")
                with pytest.raises(Killed):
                    recover_run(run)
                assert (run / JOURNAL).exists()
            monkeypatch.delenv("GPTSTACK_FAULT_KILL")
            recover_run(run)
            assert _tags(run) == ({"old"} if point == "staged" else {"new"}), (point, j, _tags(run))
            assert not _leftovers(run), (point, j)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    with commit_checkpoint(run) as tmp:
        _write_checkpoint(tmp, "old")
    with pytest.raises(OSError):
        with commit_checkpoint(run) as tmp:
            _write_checkpoint(tmp, "new")
            raise OSError("disk full")
    assert _tags(run) == {"old"} and not _leftovers(run)


def test_recovery_with_nothing_to_do_takes_no_lock_and_writes_nothing(tmp_path, monkeypatch):
    """Every load calls recover_run: on a complete run (or a missing one) it must only list the directory, so
    read-only runs still load and readers never wait on each other."""
    run = tmp_path / "run"
    with commit_checkpoint(run) as tmp:
        _write_checkpoint(tmp, "old")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    monkeypatch.setattr(checkpoint, "_locked", None)   # calling it would fail
    recover_run(run)
    recover_run(tmp_path / "missing")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    """--threads 1 (every run here, killed or not, computes alike) sets torch's threads for this process."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---- the stage CLI, killed with SIGKILL ---------------------------------------------------------------------

# (fault, step of the committed checkpoint after recovery (0: none), what the directory holds before recovery)
KILL_POINTS = [
    ("staged@1", 0, "first save written, not committed: no checkpoint"),
    ("commit:2@1", 2, "first commit half renamed: weights but no trainer_state.json"),
    ("commit:5@2", 4, "second commit with tokenizer/ moved aside, the new one not yet in place"),
    ("done@2", 4, "between periodic saves"),
]


@pytest.mark.parametrize("fault,committed_step,what", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_stage_killed_in_a_save_resumes_to_the_uninterrupted_weights(tmp_path, corpus_dir, reference, capsys,
                                                                     fault, committed_step, what):
    out = tmp_path / "run"
    argv = _pretrain_argv(corpus_dir, out, steps=6, save_every=2)
    proc = _spawn(argv, tmp_path / "log.txt", fault)
    assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    on_disk = set(os.listdir(out))
    if fault.startswith("staged"):
        assert not on_disk & {"trainer_state.json", "model.safetensors", JOURNAL}, on_disk
        assert any(n.startswith(STAGING_PREFIX) for n in on_disk), on_disk
    elif fault.startswith("commit:2"):
        assert {JOURNAL, "model.safetensors"} <= on_disk and "trainer_state.json" not in on_disk, on_disk
    elif fault.startswith("commit:5"):
        assert JOURNAL in on_disk and "tokenizer" not in on_disk, on_disk
    else:
        assert JOURNAL not in on_disk and _state(out)["step"] == committed_step

    if committed_step:   # what a reader sees: the last committed checkpoint, whole
        load_model(out)
        assert _state(out)["step"] == committed_step and not _state(out)["finished"]
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    if not committed_step:
        assert "starting it from step 0" in capsys.readouterr().out
    _assert_same_run(out, reference(6, 2))
    # a plain rerun still refuses to overwrite the committed run, and says so
    assert main(argv) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_resume_without_a_committed_checkpoint_starts_fresh(tmp_path, corpus_dir, reference, capsys):
    """Missing, empty, or holding only what a run killed before its first commit leaves (metrics.jsonl,
    a staging directory, an older version's temp file): --resume trains from step 0."""
    ref = reference(6, 2)
    for name, make in [("missing", None), ("empty", []),
                       ("leftovers", ["metrics.jsonl", f"{STAGING_PREFIX}x/model.safetensors", "optimizer.pt.tmp"])]:
        out = tmp_path / name
        if make is not None:
            out.mkdir()
            for rel in make:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text('{"step": 1, "loss": 9.0}\n')
        assert main(_pretrain_argv(corpus_dir, out, 6, 2) + ["--resume"]) == 0, name
        _assert_same_run(out, ref)
    # weights but no trainer state that are not a training run's leftovers: never overwritten
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"weights")
    (merged / "config.json").write_text(json.dumps({"merged_from": "elsewhere"}))
    assert main(_pretrain_argv(corpus_dir, merged, 6, 2) + ["--resume"]) == 2
    assert "merged model" in capsys.readouterr().err
    assert (merged / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_stage_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path, corpus_dir, reference,
                                                                            seed):
    """A checkpoint every step, so a kill lands in a commit as often as between them. The moment is seeded:
    once step k (of 30) is logged, after a further 0-40 ms, so it falls anywhere in a step-and-save cycle and
    always before the run ends (a timer from the start could outlast these fast steps)."""
    out = tmp_path / "run"
    argv = _pretrain_argv(corpus_dir, out, steps=30, save_every=1)
    log = tmp_path / "log.txt"
    rng = random.Random(seed)
    k, delay = rng.randint(3, 24), rng.uniform(0.0, 0.04)
    proc = _spawn(argv, log)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(_losses_so_far(metrics)) >= k):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, ("the run ended before the kill: nothing was interrupted", log.read_text()[-3000:])
    if (out / "trainer_state.json").exists():
        assert not _state(out)["finished"]
    assert main(argv + ["--resume"]) == 0
    _assert_same_run(out, reference(30, 1))


# ---- the pipeline ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_killed_mid_stage_reruns_to_completion(tmp_path, corpus_dir):
    """Killed in the middle of its first stage's save (weights renamed into place, trainer_state.json not:
    what used to leave a directory that neither a plain rerun nor --resume would take): the rerun finishes
    that save, reuses the stage and runs the next one."""
    root = tmp_path / "pipe"
    argv = ["pipeline", "--preset", "micro", "--only", "base,sft", "--corpus", str(corpus_dir), "--out", str(root)]
    proc = _spawn(argv, tmp_path / "log.txt", "commit:2@1")
    assert proc.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    on_disk = set(os.listdir(root / "base"))
    assert {JOURNAL, "model.safetensors"} <= on_disk and "trainer_state.json" not in on_disk, on_disk
    assert not (root / "sft").exists()
    assert main(argv) == 0
    stages = json.loads((root / "pipeline.json").read_text())["stages"]
    assert stages["base"]["status"] == "reused" and stages["sft"]["status"] == "done", stages
    for stage in ("base", "sft"):
        assert _state(root / stage)["finished"] and not _leftovers(root / stage)
        load_model(root / stage)
