"""The CLI end to end at tiny scale, and every bad input exits 2 with one line and nothing overwritten."""

import json
import os
import time
import subprocess
import sys

import pytest

from gptstack.cli import main

TINY = ["--vocab-size", "320", "--depth", "2", "--n-embd", "64", "--seq-len", "32", "--batch-size", "4",
        "--total-batch-tokens", "0", "--minutes", "0", "--eval-every", "5", "--eval-tokens", "256", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("cli") / "base"
    assert main(["pretrain", "--corpus", str(corpus_dir), "--steps", "10", "--out", str(out)] + TINY) == 0
    return out


def test_pretrain_writes_a_complete_run(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer", "trainer_state.json", "optimizer.pt",
            "metrics.jsonl"} <= names
    assert (tiny_run / "tokenizer" / "tokenizer.json").exists()
    state = json.loads((tiny_run / "trainer_state.json").read_text())
    assert state["finished"] and state["step"] == 10
    evals = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in l]
    assert evals and 0 < evals[-1]["val_bpb"] < 10


def test_sample_streams_and_bpb(tiny_run, tmp_path, capsys):
    assert main(["sample", str(tiny_run), "--prompt", "The king", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The king")
    text = tmp_path / "t.txt"
    text.write_text("The queen hath spoken, sweet lord.\n" * 20)
    assert main(["bpb", str(tiny_run), str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_bpb"] > 0 and result["bytes"] == len(text.read_bytes())


def test_tokenizer_commands(tiny_run, capsys):
    assert main(["tokenizer", "info", str(tiny_run), "--text", "hello world", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 320 and info["bytes_per_token"] > 0
    assert main(["tokenizer", "encode", str(tiny_run), "--text", "hi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_console_script_help_is_fast_and_works():
    exe = os.path.join(os.path.dirname(sys.executable), "gptstack")
    subprocess.run([exe, "--help"], capture_output=True, timeout=60)   # warm the file cache
    t0 = time.perf_counter()
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0 and "pretrain" in r.stdout
    assert seconds < 1.0, f"gptstack --help took {seconds:.2f} s"


def test_every_flag_says_what_it_does_and_lists_its_choices():
    """The help of every flag of every command: a description (from the config field's own documentation for
    config flags), and the choices for a flag with a fixed set of values."""
    import argparse

    from gptstack.cli import build_parser
    from gptstack.config import RLConfig, SFTConfig, field_choices, settable_fields

    sub = build_parser()._actions[-1]
    missing = []
    parsers = list(sub.choices.items())
    while parsers:                      # nested command groups (`gptstack data notes`) are walked too
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {n}", p) for n, p in action.choices.items()]
            text = (action.help or "").split("(default")[0].strip()
            if not text:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "flags without a description: " + ", ".join(missing)
    for cls, command in ((SFTConfig, "sft"), (RLConfig, "rl")):
        actions = {a.dest: a for a in sub.choices[command]._actions}
        for f in settable_fields(cls):
            if field_choices(f):
                assert list(actions[f.name].choices) == list(field_choices(f)), (command, f.name)
    assert "--batch-size" not in sub.choices["rl"].format_help()   # RL derives it from its rollout: not offered


def test_help_imports_no_torch():
    """Every command's parser (and so `gptstack --help` and `gptstack COMMAND --help`) is built from torch-free
    config classes: a fresh interpreter has no torch in sys.modules after build_parser() or any --help."""
    code = ("import sys, contextlib, io\n"
            "from gptstack.cli import build_parser, main\n"
            "names = list(build_parser()._actions[-1].choices)\n"
            "for argv in [['--help']] + [[n, '--help'] for n in names]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'peft') if m in sys.modules)\n"
            "print(len(names), heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n, heavy = r.stdout.split(" ", 1)
    assert int(n) >= 15 and heavy.strip() == "[]", r.stdout


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        ["pretrain", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "x")] + TINY,
        ["pretrain", "--corpus", str(empty), "--out", str(tmp_path / "y")] + TINY,
        ["sample", str(tmp_path), "--prompt", "x"],
        ["sample", str(tiny_run), "--prompt", ""],
        ["sample", str(tiny_run), "--prompt", "word " * 400],
        ["bpb", str(tiny_run), str(tmp_path / "nope.txt")],
        ["bpb", str(tiny_run), str(empty)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        _err(capsys)


def test_existing_run_is_not_overwritten(tiny_run, corpus_dir, capsys):
    before = (tiny_run / "model.safetensors").read_bytes()
    assert main(["pretrain", "--corpus", str(corpus_dir), "--steps", "2", "--out", str(tiny_run)] + TINY) == 2
    assert "--resume" in _err(capsys)
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_corrupt_checkpoint(tiny_run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:100])
    assert main(["sample", str(bad), "--prompt", "x"]) == 2
    assert "corrupt" in _err(capsys)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, corpus_dir):
    """DDP over 2 CPU ranks (gloo) with 4 rows each trains like one process with 8 rows."""
    flags = ["--corpus", str(corpus_dir), "--vocab-size", "320", "--depth", "2", "--n-embd", "64", "--seq-len", "32",
             "--total-batch-tokens", "0", "--minutes", "0", "--steps", "4", "--eval-every", "4", "--eval-tokens", "256",
             "--no-progress", "--log-every", "1"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "gptstack.cli", "pretrain", "--batch-size", "4",
                        "--out", str(tmp_path / "ddp")] + flags, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert main(["pretrain", "--batch-size", "8", "--out", str(tmp_path / "one")] + flags) == 0

    def losses(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) < 1e-3 for x, y in zip(a, b)), (a, b)


def test_threads_flag_on_every_command(monkeypatch, capsys):
    """--threads is offered by every command and sets torch's thread count for the process; a malformed
    GPTSTACK_THREADS is a one-line error."""
    import torch

    from gptstack.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert any("--threads" in a.option_strings for a in p._actions), name
    before = torch.get_num_threads()
    monkeypatch.setenv("GPTSTACK_THREADS", os.environ.get("GPTSTACK_THREADS", ""))   # restored after the test
    try:
        assert main(["tasks", "list", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("GPTSTACK_THREADS", "two")
        capsys.readouterr()
        assert main(["tasks", "list"]) == 2
        err = capsys.readouterr().err.strip()
        assert "GPTSTACK_THREADS must be a whole number" in err and "\n" not in err
    finally:
        torch.set_num_threads(before)
