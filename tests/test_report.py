"""The pipeline report: built from a synthetic RUN_ROOT (well-formed fake metrics and eval JSON written here),
checked as data, as files, and in a real headless Chromium (rendering, plots loaded, links, console)."""

import json
import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gptstack.errors import DataError
from gptstack.pipeline.report import build_report, collect
from gptstack.pipeline.report.render import SECTIONS

NASTY = '<script>alert("x")</script> & <b>bold</b>'
TASKS = ("arithmetic_direct", "arithmetic_cot", "spelling", "extraction")


def _write_run(d: Path, train: list[dict], evals: list[dict], last: dict, elapsed: float, config: dict | None = None):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config or {"kind": "lm"}))
    lines = [json.dumps(r) for r in train + evals]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    step = max(r["step"] for r in train)
    (d / "trainer_state.json").write_text(json.dumps(
        {"step": step, "tokens": step * 8192, "elapsed": elapsed, "finished": True, "last": last}))


def _train(n, **curves):
    return [{"step": s, "tokens": s * 8192, "lr_mult": 1.0, "tok_per_s": 1500.0, "elapsed": s * 2.0,
             **{k: round(f(s), 5) for k, f in curves.items()}} for s in range(1, n + 1)]


def _eval(stage, base_acc, div=None, mixed=None, extra=None):
    tasks = {t: {"greedy": min(1.0, base_acc + 0.1 * i), "sample": max(0.0, base_acc - 0.05)}
             for i, t in enumerate(TASKS)}
    out = {"stage": stage, "tasks": tasks,
           "samples": [{"prompt": "What is 2 + 3?", "reply": "5", "task": "arithmetic_direct", "reward": 1.0},
                       {"prompt": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": f"Spell {NASTY}"}],
                        "reply": f"reply {NASTY}", "task": "spelling", "reward": 0.0}]}
    if div:
        out["diversity"] = div
    if mixed:
        out["diversity_mixed"] = mixed
    out.update(extra or {})
    return out


def _div(quality, entropy, d2, bleu):
    return {"distinct_1": d2 * 0.7, "distinct_2": d2, "distinct_3": min(1.0, d2 * 1.1), "self_bleu": bleu,
            "embedding_similarity": bleu * 0.9 + 0.1, "entropy": entropy, "quality": quality, "n_prompts": 8, "k": 4}


MACHINE = {"cpu": {"model": "AMD EPYC 7B13", "arch": "x86_64", "cores": 2, "flags": ["avx2", "fma"]},
           "device": "cpu", "threads": 2, "torch": "2.13.0+cpu", "autocast": "fp32", "optimizer_matmul": "float32",
           "bf16_probe": {"bf16_over_fp32": 50.1, "fp32_ms": 1.0, "bf16_ms": 50.1, "fast": False},
           "busy_cores_at_start": 1.2}


def make_run_root(root: Path) -> Path:
    model = {"vocab_size": 8192, "n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 4, "mlp_hidden": 704,
             "seq_len": 256}
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "meta.json").write_text(json.dumps({"vocab_size": 8192}))
    _write_run(root / "base", _train(60, loss=lambda s: 3 + 6 * math.exp(-s / 12) + 0.1 * math.sin(s)),
               [{"step": s, "tokens": s * 8192, "val_loss": 3.2 + 6 * math.exp(-s / 12),
                 "val_bpb": 1.5 + 2.5 * math.exp(-s / 12)} for s in (20, 40, 60)],
               {"val_bpb": 1.5 + 2.5 * math.exp(-5), "val_loss": 3.25}, 361.0,
               {"kind": "lm", "model": model, "data": {"train_tokens": 1_200_000}, "machine": MACHINE,
                "throughput": {"steps": 60, "tokens": 60 * 8192, "seconds": 300.0, "tok_per_s": 1638.4,
                               "steps_per_minute": 12.0, "budget": {"steps": 0, "minutes": 5.0}}})
    for name, scale in (("sft", 1.0), ("sft_lora", 1.3)):
        _write_run(root / name, _train(40, loss=lambda s, k=scale: k * (1 + 2 * math.exp(-s / 8))),
                   [{"step": s, "tokens": s * 8192, "val_loss": scale * (1.1 + 2 * math.exp(-s / 8))} for s in (20, 40)],
                   {"val_loss": scale * 1.15}, 120.0 * scale)
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                                              for _ in range(37)))
    _write_run(root / "rm", _train(30, accuracy=lambda s: 0.5 + 0.4 * (1 - math.exp(-s / 8)),
                                   margin=lambda s: 2 * (1 - math.exp(-s / 8))),
               [{"step": 30, "tokens": 30 * 8192, "val_accuracy": 0.81, "val_margin": 1.6, "val_loss": 0.42}],
               {"val_accuracy": 0.81, "val_margin": 1.6, "val_loss": 0.42, "accuracy": 0.88}, 60.0)
    _write_run(root / "grpo", _train(50, reward=lambda s: 0.3 + 0.5 * (1 - math.exp(-s / 15)) + 0.05 * math.sin(3 * s),
                                     kl=lambda s: 0.002 * s, entropy=lambda s: 1.8 * math.exp(-s / 40), loss=lambda s: 0.1),
               [], {"reward": 0.78, "kl": 0.1, "entropy": 0.5}, 240.0)
    _write_run(root / "dpo", _train(30, accuracy=lambda s: 0.5 + 0.3 * s / 30, reward_margin=lambda s: 0.05 * s,
                                    loss=lambda s: 0.69 - 0.01 * s),
               [{"step": 30, "tokens": 0, "val_accuracy": 0.74, "val_reward_margin": 1.2}],
               {"val_accuracy": 0.74, "val_reward_margin": 1.2}, 90.0)
    (root / "eval").mkdir()
    evals = {
        "base": _eval("base", 0.0, _div(0.05, 2.9, 0.85, 0.08)),
        "sft": _eval("sft", 0.35, _div(0.40, 1.4, 0.55, 0.30), _div(0.33, 2.1, 0.72, 0.15),
                     {"json_validity": {"constrained": 1.0, "unconstrained": 0.62},
                      "retrieval": {"accuracy_without": 0.04, "accuracy_with_retrieval": 0.71,
                                    "accuracy_gold_context": 0.75, "retrieval_recall": 0.96},
                      "alignment": {"entropy": 0.61, "kl_to_sft": 0.0}}),
        "sft_lora": _eval("sft_lora", 0.3, _div(0.36, 1.5, 0.6, 0.27)),
        "grpo": _eval("grpo", 0.55, _div(0.62, 0.7, 0.35, 0.55), _div(0.55, 1.5, 0.6, 0.3),
                      {"json_validity": {"constrained": 1.0, "unconstrained": 0.7},
                       "alignment": {"entropy": 0.42, "kl_to_sft": 1.234}}),
        "dpo": _eval("dpo", 0.45, _div(0.5, 1.0, 0.45, 0.4)),
    }
    for t in evals["grpo"]["tasks"].values():
        t.update(vote=min(1.0, t["greedy"] + 0.05), best_of=min(1.0, t["greedy"] + 0.08))
    for name, ev in evals.items():
        (root / "eval" / f"{name}.json").write_text(json.dumps(ev))
    stages = {"tokenizer": 2.0, "base": 365.0, "sft": 125.0, "sft_lora": 160.0, "prefs": 30.0, "rm": 62.0,
              "grpo": 245.0, "dpo": 95.0, "eval": 180.0}
    pipeline = {"preset": "tiny", "stages": {k: {"seconds": v, "status": "done"} for k, v in stages.items()}}
    pipeline["stages"]["ppo"] = {"seconds": 0.0, "status": "skipped"}
    pipeline["stages"]["base"]["expected_steps"] = 166   # 60 reached in 5 minutes: a low-throughput warning
    pipeline["stages"]["sft"]["expected_steps"] = 40     # reached: none
    (root / "pipeline.json").write_text(json.dumps(pipeline))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_run_root(tmp_path_factory.mktemp("run"))
    return build_report(root)


# ---- data and files ---------------------------------------------------------------------------------------

def test_report_files_and_numbers(report):
    root = report.parent
    assert report.name == "report.html" and (root / "report.md").exists()
    j = json.loads((root / "report.json").read_text())
    s = j["summary"]
    assert s["preset"] == "tiny"
    assert s["total_seconds"] == pytest.approx(2 + 365 + 125 + 160 + 30 + 62 + 245 + 95 + 180)
    assert s["final_val_bpb"] == pytest.approx(1.5 + 2.5 * math.exp(-5))
    assert s["best_stage"] == "grpo" and s["rm_val_accuracy"] == pytest.approx(0.81)
    assert s["pretrain_tokens"] == 60 * 8192
    status = {r["stage"]: r["status"] for r in j["stages"]}
    assert status["ppo"] == "skipped" and status["base"] == "done"
    assert any("PPO" in m and "skipped" in m for m in j["missing"])
    assert set(j["plots"]) == {"time", "pretraining", "sft", "accuracy", "collapse", "rl", "rm", "dpo"}
    for rel in j["plots"].values():
        assert (root / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "report.md").read_text()
    assert "| SFT |" in md and "report_files/accuracy.png" in md and "35.0%" in md
    assert "Retrieval vs memory" in md and "71.0%" in md
    assert "KL to SFT" in md and "1.234" in md
    assert "## Machine & throughput" in md and "AMD EPYC 7B13" in md and "fp32 used" in md


def test_machine_and_low_throughput_warning(report):
    j = json.loads((report.parent / "report.json").read_text())
    assert j["machine"]["cpu"]["model"] == "AMD EPYC 7B13"
    rows = {r["stage"]: r for r in j["throughput"]}
    assert rows["base"]["steps"] == 60 and rows["base"]["expected_steps"] == 166
    assert "reached 60 steps" in rows["base"]["warning"] and "~166" in rows["base"]["warning"]
    assert "--budget steps" in rows["base"]["warning"] and "1.2 cores busy" in rows["base"]["warning"]
    assert rows["sft"]["warning"] is None            # expected 40, reached 40
    assert rows["grpo"]["warning"] is None           # no expectation recorded: no warning
    md = (report.parent / "report.md").read_text()
    assert md.count("**Warning:**") == 1


def test_html_is_self_contained_and_escaped(report):
    page = report.read_text()
    assert "<script" not in page.replace("&lt;script", "")          # the sample's <script> arrives escaped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page  # markupsafe's escaping of the sample
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 8


def test_missing_run_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_report(tmp_path / "nope")
    with pytest.raises(DataError, match="no pipeline outputs"):
        build_report(tmp_path)


def test_cli_report(tmp_path, capsys):
    from gptstack.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gptstack report: error:") and "does not exist" in err
    root = tmp_path / "partial"
    _write_run(root / "base", _train(5, loss=lambda s: 5.0 / s), [], {"val_bpb": 2.0}, 10.0)
    assert main(["report", str(root)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_partial_run_says_what_is_missing(tmp_path):
    root = tmp_path / "run"
    _write_run(root / "base", _train(5, loss=lambda s: 5.0 / s), [], {"val_bpb": 2.0}, 10.0)
    (root / "sft").mkdir()
    (root / "sft" / "metrics.jsonl").write_text('{"step": 1, "lr_mult": 1, "loss": 2.0}\n{"step": 2, "lr_')  # torn
    (root / "pipeline.json").write_text(json.dumps({"stages": {"base": {"seconds": 10, "status": "done"},
                                                               "sft": {"seconds": 3, "status": "failed",
                                                                       "error": "out of <memory>"}}}))
    page = build_report(root).read_text()
    data = collect(root)
    assert data["summary"]["failed"] == ["sft"]
    assert any("Reward model" in m for m in data["missing"])
    assert any("unreadable line" in n for n in data["notes"])
    assert "out of &lt;memory&gt;" in page and "No evaluation results" in page
    assert "No machine recorded" in page          # a run root made before runs recorded their machine


# ---- one section list, autoescaping, rebuilding an old run root ---------------------------------------------

class _Page(HTMLParser):
    """h2 titles, the navigation bar's links and the table rows (cell texts) of a report page."""

    def __init__(self, page: str):
        super().__init__()
        self.h2, self.nav, self.rows, self.tags, self._text, self._row = [], [], [], [], None, None
        self._in_nav = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_nav |= tag == "nav"
        if tag == "tr":
            self._row = []
        elif tag in ("h2", "a", "td", "th"):
            self._text = []

    def handle_endtag(self, tag):
        self._in_nav &= tag != "nav"
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag in ("h2", "a", "td", "th") and self._text is not None:
            text = "".join(self._text).strip()
            if tag == "h2":
                self.h2.append(text)
            elif tag == "a" and self._in_nav:
                self.nav.append(text)
            elif tag in ("td", "th") and self._row is not None:
                self._row.append(text)
            self._text = None

    def handle_data(self, d):
        if self._text is not None:
            self._text.append(d)


def _md_titles(md: str) -> list[str]:
    return [line[3:] for line in md.splitlines() if line.startswith("## ")]


def _md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_one_section_list_for_html_and_markdown(report, tmp_path):
    titles = [s.title for s in SECTIONS]
    assert len(set(titles)) == len(titles) == 8
    partial = tmp_path / "partial"
    _write_run(partial / "base", _train(5, loss=lambda s: 5.0 / s), [], {"val_bpb": 2.0}, 10.0)
    for page_path in (report, build_report(partial)):     # a full run and one with most sections empty
        page = _Page(page_path.read_text())
        md = (page_path.parent / "report.md").read_text()
        assert page.h2 == titles and _md_titles(md) == titles
        assert page.nav == [s.nav for s in SECTIONS]
    # the titles are in the section list only: neither the template nor the Markdown code spells one
    import gptstack.pipeline.report.render as render
    template = (Path(render.__file__).parent / "report.html.j2").read_text()
    source = Path(render.__file__).read_text().split("# ---- HTML")[1]
    for t in titles:
        assert t not in template and f'"{t}"' not in source, t


def test_autoescaping_of_every_value_from_the_run(tmp_path):
    root = make_run_root(tmp_path / "run")
    ev = json.loads((root / "eval" / "sft.json").read_text())
    ev["samples"][0].update(task=f"task {NASTY}", prompt=[{"role": "user", "content": NASTY}])
    ev["tasks"][f"t{NASTY}"] = {"greedy": 0.5}
    (root / "eval" / "sft.json").write_text(json.dumps(ev))
    pipeline = json.loads((root / "pipeline.json").read_text())
    pipeline["preset"] = NASTY
    pipeline["stages"]["dpo"] = {"status": "failed", "error": NASTY}
    (root / "pipeline.json").write_text(json.dumps(pipeline))
    cfg = json.loads((root / "base" / "config.json").read_text())
    cfg["machine"]["cpu"]["model"] = NASTY
    (root / "base" / "config.json").write_text(json.dumps(cfg))
    page = build_report(root).read_text()
    parsed = _Page(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags     # no markup from the data...
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") >= 6     # ...only its escaped text
    assert any(NASTY in cell for row in parsed.rows for cell in row)
    # the page's own markup is still markup: the template, not the data, builds badges and warnings
    assert '<span class="badge b-failed">failed</span>' in page and '<div class="warn">' in page
    assert NASTY in (root / "report.md").read_text()                # Markdown is text: left as it is


def test_rl_task_from_pipeline_json(tmp_path):
    root = make_run_root(tmp_path / "run")
    assert collect(root)["rl_task"] == "arithmetic_direct"           # made before pipeline.json recorded it
    pipeline = json.loads((root / "pipeline.json").read_text())
    (root / "pipeline.json").write_text(json.dumps({**pipeline, "rl_task": "spelling"}))
    for name in ("sft", "grpo"):        # an eval file whose rl_target predates its "task" key
        ev = json.loads((root / "eval" / f"{name}.json").read_text())
        ev["rl_target"] = {"n": 30, "greedy": 0.5, "sample": 0.25}
        (root / "eval" / f"{name}.json").write_text(json.dumps(ev))
    assert collect(root)["rl_task"] == "spelling"
    md = (build_report(root).parent / "report.md").read_text()
    assert "spelling, 30 problems (greedy)" in md and "spelling, 30 problems (T=1)" in md


def make_old_style_root(root: Path) -> Path:
    """A micro run root laid out as the pre-package pipeline wrote it: pipeline.json without "rl_task", the RM
    stages skipped (every reply tied: an empty prefs.jsonl), eval files with "rl_target", and the old build's
    report files still there."""
    machine = {"cpu": {"model": "AMD EPYC", "arch": "x86_64", "cores": 2, "flags": ["avx2", "fma"]},
               "device": "cpu", "threads": 1, "torch": "2.13.0+cpu", "autocast": "fp32",
               "optimizer_matmul": "float32", "bf16_probe": {"bf16_over_fp32": 48.737, "fast": False}}
    model = {"vocab_size": 1024, "n_layer": 1, "n_embd": 64, "n_head": 1, "n_kv_head": 1, "mlp_hidden": 192,
             "seq_len": 256, "tie_embeddings": False}
    runs = {  # name: (steps, tokens per step, last record, tok/s, steps/min)
        "base": (10, 2048, {"loss": 5.482954, "val_loss": 5.504385, "val_bpb": 3.283229}, 21798.4, 638.6),
        "sft": (4, 662, {"loss": 4.1, "val_loss": 4.364}, 10512.0, 953.0),
        "grpo": (2, 96, {"loss": 0.01, "reward": 0.0, "kl": 0.001, "entropy": 6.2, "eval_accuracy": 0.0},
                 1790.0, 1121.5),
        "distill": (2, 48, {"loss": 0.368907, "reverse_kl": 0.368907, "entropy": 6.163088}, 1298.6, 1623.2),
    }
    for name, (steps, per, last, tps, spm) in runs.items():
        d = root / name
        d.mkdir(parents=True)
        cfg = {"kind": "lm", "model": model, "machine": machine,
               "throughput": {"steps": steps, "tok_per_s": tps, "steps_per_minute": spm, "budget": {"steps": steps}}}
        if name == "base":
            cfg["data"] = {"train_tokens": 1898488}
        (d / "config.json").write_text(json.dumps(cfg))
        train = {k: v for k, v in last.items() if not k.startswith("val")}
        val = {k: v for k, v in last.items() if k.startswith("val")}
        recs = [{"step": s, "tokens": s * per, "lr_mult": 1.0, **train} for s in range(1, steps + 1)]
        if val:
            recs.append({"step": steps, "tokens": steps * per, **val})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "trainer_state.json").write_text(json.dumps(
            {"step": steps, "tokens": steps * per, "elapsed": 0.5, "finished": True, "last": {"step": steps, **last}}))
    (root / "prefs.jsonl").write_text("")
    (root / "eval").mkdir()
    for i, name in enumerate(("base", "sft", "grpo", "distill")):
        acc = 0.1 * i
        ev = {"stage": name, "n": 3,
              "tasks": {"arithmetic_cot": {"greedy": acc, "sample": acc / 2, "vote": acc},
                        "arithmetic_direct": {"greedy": acc / 2, "sample": 0.0},
                        "spelling": {"greedy": 1 - acc, "sample": 0.5}},
              "json_validity": {"unconstrained": acc, "constrained": 1.0},
              "diversity": {"distinct_1": 0.68, "distinct_2": 0.98 - acc, "distinct_3": 1.0, "self_bleu": 0.07 + acc,
                            "embedding_similarity": 0.36, "entropy": 5.7 - i, "quality": acc},
              "samples": [{"prompt": [{"role": "user", "content": "What is 98 - 24? Give just the answer."}],
                           "reply": f"{70 + i}", "task": "arithmetic_direct", "reward": float(i == 3)}]}
        if name != "base":
            ev["alignment"] = {"entropy": 5.316 + i, "kl_to_sft": 0.0 if name == "sft" else 1.5 * i, "n_prompts": 7}
            ev["rl_target"] = {"task": "arithmetic_direct", "n": 30, "greedy": acc / 3, "sample": acc / 4,
                               "temperature": 1.0, "samples": 2}
        (root / "eval" / f"{name}.json").write_text(json.dumps(ev))
    stages = {"base": 4.1, "sft": 1.2, "prefs": 0.1, "grpo": 0.4, "distill": 0.4, "eval": 30.8}
    pipeline = {"preset": "micro", "corpus": "shakespeare", "budget": "steps",
                "stages": {k: {"status": "done", "seconds": v} for k, v in stages.items()},
                "total_seconds_this_run": 37.0}
    for n in ("rm", "ppo", "dpo"):
        pipeline["stages"][n] = {"status": "skipped", "error": "no preference pairs: every sampled reply tied"}
    (root / "pipeline.json").write_text(json.dumps(pipeline))
    for f in ("report.html", "report.md", "report.json"):      # the old build's output, to be replaced
        (root / f).write_text("stale")
    (root / "report_files").mkdir()
    (root / "report_files" / "time.png").write_bytes(b"stale")
    return root


# what the pre-package report code (eval/report.py, then pipeline/report/__init__.py at 24ece82) wrote into
# report.md for make_old_style_root: every table row, in order
OLD_MD_TABLE_ROWS = """
| stage | status | time | steps | tokens | result |
| Base (pretrain) | done | 4.1 s | 10 | 20.5k | val bpb 3.283, val loss 5.504 |
| SFT | done | 1.2 s | 4 | 2.65k | val loss 4.364 |
| Preference pairs | done | 0.1 s | — | — | pairs 0 |
| Reward model | skipped | — | — | — |  |
| GRPO (task) | done | 0.4 s | 2 | 192 | reward 0.000, eval accuracy 0.000 |
| PPO (RM) | skipped | — | — | — |  |
| DPO | skipped | — | — | — |  |
| Distilled (LoRA ← SFT) | done | 0.4 s | 2 | 96 |  |
| Evaluation | done | 31 s | — | — |  |
| stage | budget | steps | expected steps | tokens/s | steps/min |  |
| Base (pretrain) | steps | 10 | — | 21.8k | 638.6 |  |
| SFT | steps | 4 | — | 10.5k | 953.0 |  |
| GRPO (task) | steps | 2 | — | 1.79k | 1121.5 |  |
| Distilled (LoRA ← SFT) | steps | 2 | — | 1.3k | 1623.2 |  |
| stage | arithmetic cot | arithmetic direct | spelling | mean |
| Base (pretrain) | 0.0% | 0.0% | 100.0% | 33.3% |
| SFT | 10.0% | 5.0% | 90.0% | 35.0% |
| GRPO (task) | 20.0% | 10.0% | 80.0% | 36.7% |
| Distilled (LoRA ← SFT) | 30.0% | 15.0% | 70.0% | 38.3% |
| stage | greedy | sample (T=1) | self-consistency vote |
| Base (pretrain) | 33.3% | 16.7% | 0.0% |
| SFT | 35.0% | 18.3% | 10.0% |
| GRPO (task) | 36.7% | 20.0% | 20.0% |
| Distilled (LoRA ← SFT) | 38.3% | 21.7% | 30.0% |
| stage | arithmetic: direct | arithmetic: CoT | Δ |
| Base (pretrain) | 0.0% | 0.0% | +0.0 pts |
| SFT | 5.0% | 10.0% | +5.0 pts |
| GRPO (task) | 10.0% | 20.0% | +10.0 pts |
| Distilled (LoRA ← SFT) | 15.0% | 30.0% | +15.0 pts |
| stage | constrained decoding | unconstrained |
| Base (pretrain) | 100.0% | 0.0% |
| SFT | 100.0% | 10.0% |
| GRPO (task) | 100.0% | 20.0% |
| Distilled (LoRA ← SFT) | 100.0% | 30.0% |
| model | entropy (nats) | distinct-1 | distinct-2 | distinct-3 | self-BLEU ↓ | embed. sim ↓ | quality |
| Base (pretrain) | 5.700 | 0.680 | 0.980 | 1.000 | 0.070 | 0.360 | 0.000 |
| SFT | 4.700 | 0.680 | 0.880 | 1.000 | 0.170 | 0.360 | 0.100 |
| GRPO (task) | 3.700 | 0.680 | 0.780 | 1.000 | 0.270 | 0.360 | 0.200 |
| Distilled (LoRA ← SFT) | 2.700 | 0.680 | 0.680 | 1.000 | 0.370 | 0.360 | 0.300 |
| stage | accuracy (greedy) | accuracy (sampled) | KL to SFT (nats/reply) | policy entropy (nats/token) | arithmetic direct, 30 problems (greedy) | arithmetic direct, 30 problems (T=1) |
| SFT | 35.0% | 18.3% | 0.000 | 6.316 | 3.3% | 2.5% |
| GRPO (task) | 36.7% | 20.0% | 3.000 | 7.316 | 6.7% | 5.0% |
| Distilled (LoRA ← SFT) | 38.3% | 21.7% | 4.500 | 8.316 | 10.0% | 7.5% |
| reward model | value |
| preference pairs (prefs.jsonl) | 0 |
"""
# its Markdown section titles; the one section list took the HTML's title for two of them
OLD_MD_TITLES = ["Stages & time", "Machine & throughput", "Pretraining", "SFT", "Task accuracy (greedy)",
                 "Model collapse", "Reward model & RL", "Sample conversations"]
RENAMED = {"SFT": "Supervised fine-tuning", "Task accuracy (greedy)": "Task accuracy"}


def test_rebuilds_a_run_root_made_by_the_old_code(tmp_path):
    root = make_old_style_root(tmp_path / "run")
    page_path = build_report(root)
    md = (root / "report.md").read_text()
    assert _md_titles(md) == [RENAMED.get(t, t) for t in OLD_MD_TITLES] == [s.title for s in SECTIONS]
    assert _md_rows(md) == _md_rows(OLD_MD_TABLE_ROWS)
    page = _Page(page_path.read_text())
    assert page.h2 == [s.title for s in SECTIONS]
    assert page.rows == _md_rows(OLD_MD_TABLE_ROWS)                  # the HTML shows the same numbers
    j = json.loads((root / "report.json").read_text())
    assert set(j) == {"run_root", "built", "summary", "stages", "machine", "throughput", "missing", "notes",
                      "evals", "reward_model", "final", "plots"}
    assert j["summary"]["best_stage"] == "distill" and j["summary"]["params"] == 184320
    assert set(j["plots"]) == {"time", "pretraining", "sft", "accuracy", "collapse", "rl"}
    assert (root / "report_files" / "time.png").read_bytes()[:4] == b"\x89PNG"     # the stale plot replaced
    assert "stale" not in md and page_path.read_text().startswith("<!DOCTYPE html>")


# ---- in a real browser ------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and os.path.exists(c):
            return c
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; `make browser` does it)")


def test_report_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    console, page_errors, requests = [], [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            assert page.title().startswith("gptstack report")
            assert page.inner_text("h1") == "gptstack run report"
            for sid in ("stages", "machine", "pretraining", "sft", "accuracy", "collapse", "alignment", "samples"):
                assert page.locator(f"section#{sid} h2").count() == 1, sid
            imgs = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            assert len(imgs) == 8
            assert all(done and width > 0 for done, width, _ in imgs), imgs
            hrefs = page.evaluate("Array.from(document.querySelectorAll('[href]')).map(a => a.getAttribute('href'))")
            assert hrefs, "the section navigation is missing"
            for h in hrefs:
                assert h.startswith("#") and page.locator(h).count() == 1, f"broken link {h}"
            assert page.evaluate("document.scripts.length") == 0
            # the escaped sample shows as text, not markup
            assert NASTY in page.inner_text("#samples")
            assert page.locator("#samples b").count() == 0
            machine = page.inner_text("#machine")
            assert "AMD EPYC 7B13" in machine and "avx2" in machine and "fp32 used" in machine
            warn = page.locator("#machine .warn")
            assert page.locator(".warn").count() == 2 and page.locator("#stages .warn a[href=\"#machine\"]").count() == 1
            assert warn.count() == 1 and warn.is_visible() and "reached 60 steps" in warn.inner_text()
            assert warn.evaluate("e => getComputedStyle(e).color") == "rgb(153, 27, 27)"   # red text
            assert "166" in page.locator("#machine table").inner_text()
            cells = page.locator("#accuracy table").first.inner_text()
            assert "SFT · LoRA" in cells and "35.0%" in cells
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("GPTSTACK_REPORT_SHOT"):
                shutil.copy(shot, os.environ["GPTSTACK_REPORT_SHOT"])
        finally:
            browser.close()
    assert not page_errors, page_errors
    assert not [t for kind, t in console if kind == "error"], console
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
