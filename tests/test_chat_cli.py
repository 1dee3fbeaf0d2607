"""`gptstack chat` and `generate` through the CLI: multi-turn chat over stdin, one-shot, and every bad input
giving one line and exit 2."""

import json
import os
import subprocess
import sys

import pytest

from _infer_util import save_run, tiny_model
from gptstack.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer):
    return save_run(tmp_path_factory.mktemp("run") / "chat", tiny_model(tiny_tokenizer, seq_len=96), tiny_tokenizer)


def gptstack(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "gptstack.cli", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=120)


def test_chat_multi_turn_over_stdin_with_commands_and_trimming(run_dir):
    # a 96-token context and 40-token replies: the third turn has to drop the oldest ones
    lines = ["Hello there my lord", "/temp 0", "What news of the king", "/system Be brief.",
             "Speak again good lady", "/bogus", "And then", "/reset", "Fair day", "/quit", "never read"]
    r = gptstack("chat", run_dir, "--max-new-tokens", "40", "--seed", "0", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[temperature 0.0]" in out and "[system prompt set]" in out and "[conversation reset]" in out
    assert "unknown command /bogus" in out
    assert "context full: dropped the" in out
    assert "never read" not in out


def test_chat_one_shot_prints_reply_and_exits(run_dir):
    r = gptstack("chat", run_dir, "-p", "Good morrow", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    again = gptstack("chat", run_dir, "-p", "Good morrow", "--max-tokens", "8", "--temperature", "0")   # the alias
    assert r.stdout == again.stdout and r.stdout.endswith("\n")


def test_generate_json_schema_output_validates(run_dir, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 1, "maximum": 50}},
              "required": ["ok", "n"], "additionalProperties": False}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    r = gptstack("generate", run_dir, "--prompt", "x", "--json-schema", str(f), "--json", "--samples", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    for c in json.loads(r.stdout)["completions"]:
        jsonschema.validate(json.loads(c["text"]), schema)


def test_generate_speculation_is_exact(run_dir):
    """--speculate K drafts by prompt lookup and verifies: the greedy text is the same as without it."""
    args = ("generate", run_dir, "--prompt", "the king the king the king the king", "--max-new-tokens", "40",
            "--temperature", "0", "--json")
    plain = gptstack(*args)
    fast = gptstack(*args, "--speculate", "4")
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert json.loads(plain.stdout)["completions"] == json.loads(fast.stdout)["completions"]


@pytest.mark.parametrize("args,needle", [
    (["generate", "{run}", "--prompt", ""], "empty"),
    (["generate", "{run}", "--prompt", "the king " * 80], "context"),
    (["generate", "{run}", "--prompt", "x", "--stop", ""], "stop sequences"),
    (["generate", "{run}", "--prompt", "x", "--samples", "0"], "--samples must be at least 1"),
    (["generate", "{run}", "--prompt", "x", "--n", "0"], "--samples must be at least 1"),
    (["generate", "{run}", "--prompt", "x", "--vote", "arithmetic_direct"], "needs --samples K"),
    (["generate", "{run}", "--prompt", "x", "--speculate", "-1"], "speculate"),
    (["generate", "{run}", "--prompt", "x", "--speculate", "4"], "not with --temperature 0.8"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "0", "--samples", "3", "--speculate", "4"],
     "not with --samples > 1"),
    (["chat", "{run}", "-p", "hi", "--temperature", "0", "--speculate", "4"], "not with chat"),
    (["generate", "{run}", "--prompt", "x", "--best-of", "0", "--reward", "rm:{run}"], "at least 1"),
    (["generate", "{run}", "--prompt", "x", "--best-of", "2", "--reward", "rm:/nonexistent/rm"], "does not exist"),
    (["generate", "{run}", "--prompt", "x", "--json-schema", "{bad_schema}"], "JSON schema"),
    (["generate", "{run}", "--prompt", "x", "--regex", "(a"], "regex"),
    (["generate", "{run}", "--prompt", "x", "--samples", "2", "--vote", "no_such_task"], "unknown task"),
    (["generate", "{run}", "--prompt", "x", "--retrieve", "{bm25_index}", "--embedder", "minilm"], "built with"),
    (["chat", "/nonexistent/run", "-p", "hi"], "not a run directory"),
    (["chat", "{run}", "-p", "hi", "--mix-base", "{run}", "--mix-weight", "2"], "mix-weight"),
])
def test_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys, args, needle):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "integer", "minimum": 5, "maximum": 1}')
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The capital of Zorvania is Kelmith.")
    idx = tmp_path / "idx"
    assert main(["index", str(docs), "--out", str(idx), "--embedder", "bm25"]) == 0
    capsys.readouterr()
    argv = [a.format(run=run_dir, bad_schema=bad, bm25_index=idx) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_chat_system_prompt_that_overflows_history_drops_turns_or_is_refused(run_dir):
    # history near the 96-token context, then a system prompt: the oldest turns make room; a system prompt
    # too long for any reply is refused and the chat goes on
    lines = ["Hello there my lord", "What news of the king", "/system Be brief and speak of kings and queens.",
             "/system " + "very long " * 60, "Fair day", "/quit"]
    r = gptstack("chat", run_dir, "--max-new-tokens", "40", "--temperature", "0", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = lines.index("[system prompt set]")
    assert lines[i - 1].startswith("[context full: dropped the")   # the system prompt made room by dropping turns
    assert "leaves no room for a reply" in lines[i + 1]
    assert lines[i + 2].strip() and not lines[i + 2].startswith("[")   # and the next turn was still answered


def test_generate_vote_json_is_the_majority_of_the_samples(run_dir, capsys):
    from gptstack.data.tasks import get_task
    from gptstack.infer.ensemble import majority_vote

    task = get_task("arithmetic_direct")
    assert main(["generate", run_dir, "--prompt", "What is 2 + 3?", "--regex", "Answer: [0-9]", "--samples", "7",
                 "--vote", "arithmetic_direct", "--temperature", "3", "--top-k", "0", "--seed", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"prompt", "answer", "answers", "completions"} and len(r["answers"]) == 7
    assert r["answer"] == majority_vote(r["answers"])[0] is not None
    assert len(r["completions"]) == 1 and task.extract(r["completions"][0]["text"]) == r["answer"]
    assert main(["generate", run_dir, "--prompt", "What is 2 + 3?", "--regex", "Answer: [0-9]", "--n", "7",
                 "--vote", "arithmetic_direct", "--temperature", "3", "--top-k", "0", "--seed", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    votes = {a: r["answers"].count(a) for a in dict.fromkeys(r["answers"]) if a is not None}
    assert out[0] == f"answer: {r['answer']}   votes: {json.dumps(votes)}" and out[1] == r["completions"][0]["text"]


def test_generate_best_of_json_keeps_the_top_scored_sample(run_dir, capsys, monkeypatch):
    import gptstack.infer.ensemble as ensemble

    seen = []

    def scorer(prompt, completion):
        raise AssertionError("the batch method should be used")

    scorer.batch = lambda pairs: seen.append(pairs) or [float(len(set(c)) % 4) for _, c in pairs]
    monkeypatch.setattr(ensemble, "reward_model_scorer", lambda run, device="cpu": scorer)
    assert main(["generate", run_dir, "--prompt", "The king", "--best-of", "5", "--reward", f"rm:{run_dir}",
                 "--seed", "2", "--max-new-tokens", "10", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"prompt", "best_of", "scores", "chosen", "completions"} and r["best_of"] == 5
    assert len(seen) == 1 and len(seen[0]) == 5
    assert r["scores"] == [float(len(set(c)) % 4) for _, c in seen[0]]
    assert r["chosen"] == r["scores"].index(max(r["scores"]))
    assert len(r["completions"]) == 1 and r["completions"][0]["tokens"] == len(seen[0][r["chosen"]][1])


def _infer_parsers():
    from gptstack.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {name: sub.choices[name] for name in ("sample", "bpb", "chat", "generate", "index")}


def test_flag_names_and_aliases_are_the_same_in_every_command():
    parsers = _infer_parsers()
    for name in ("sample", "chat", "generate"):
        p = parsers[name]
        new = p.parse_args(["RUN", "--prompt", "x", "--max-new-tokens", "7"])
        old = p.parse_args(["RUN", "--prompt", "x", "--max-tokens", "7"])
        assert new.max_new_tokens == old.max_new_tokens == 7, name
        assert not hasattr(new, "max_tokens")
    p = parsers["generate"]
    assert p.parse_args(["RUN", "--prompt", "x", "--samples", "3"]).samples == 3
    assert p.parse_args(["RUN", "--prompt", "x", "--n", "3"]).samples == 3


def test_every_inference_flag_has_help_and_fixed_values_have_choices():
    fixed = {"--quantize": {"int8", "bnb8", "nf4"}, "--embedder": {"minilm", "bm25"}, "--mix-mode": {"fixed", "entropy"}}
    for name, p in _infer_parsers().items():
        for a in p._actions:
            assert a.help and a.help.strip(), (name, a.option_strings or a.dest)
            for flag, values in fixed.items():
                if flag in a.option_strings:
                    assert set(a.choices) == values, (name, flag)
        p.format_help()   # every %(default)s in a help text formats
