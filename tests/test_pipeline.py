"""The whole pipeline at micro scale: every stage runs through the CLI, a second run reuses everything,
and the report is built from the run directories."""

import json
import time

import pytest

from gptstack.cli import main
from gptstack.pipeline import PIPELINE_PRESETS, RL_TASK


@pytest.mark.slow
def test_micro_pipeline_runs_every_stage_and_reuses_them(tmp_path, monkeypatch):
    root = tmp_path / "run"
    assert main(["pipeline", "--preset", "micro", "--out", str(root)]) == 0
    record = json.loads((root / "pipeline.json").read_text())
    stages = record["stages"]
    pairs = (root / "prefs.jsonl").read_text().strip()
    preference_stages = ("rm", "ppo", "dpo")
    for name in ("base", "sft", "sft_lora", "prefs", "grpo", "ppo_task", "distill", "eval", "report") + preference_stages:
        # an untrained micro model ties on every prompt: then the preference stages are skipped, and say so
        expected = "skipped" if name in preference_stages and not pairs else "done"
        assert stages[name]["status"] == expected, (name, stages[name])
    for stage in ("base", "sft", "sft_lora", "grpo", "ppo_task", "distill") + (("ppo", "dpo") if pairs else ()):
        result = json.loads((root / "eval" / f"{stage}.json").read_text())
        assert set(result["tasks"]) >= {"arithmetic_cot", "spelling", "extraction"}
        assert result["json_validity"]["constrained"] == 1.0  # the grammar guarantees valid JSON, even untrained
        assert "diversity" in result
        if stage != "base":
            r = result["retrieval"]
            assert r["k"] == 1 and 0 <= r["accuracy_without"] <= 1 and r["retrieval_recall"] > 0.5
            t = result["rl_target"]
            assert t["task"] == RL_TASK and t["n"] == 30 and 0 <= t["greedy"] <= 1 and 0 <= t["sample"] <= 1
            a = result["alignment"]
            assert a["entropy"] > 0 and (a["kl_to_sft"] == pytest.approx(0, abs=1e-4) if stage == "sft"
                                         else a["kl_to_sft"] is not None)
    html = (root / "report.html").read_text()
    assert "Task accuracy" in html and "<img" in html and "PPO (task)" in html

    t0 = time.time()
    assert main(["pipeline", "--preset", "micro", "--out", str(root)]) == 0
    assert time.time() - t0 < 60
    stages = json.loads((root / "pipeline.json").read_text())["stages"]
    for name in ("base", "sft", "sft_lora", "prefs", "grpo", "ppo_task", "distill", "eval") + (preference_stages if pairs else ()):
        assert stages[name]["status"] == "reused", (name, stages[name])


def test_pipeline_rejects_unknown_stage_and_preset(tmp_path, capsys):
    assert main(["pipeline", "--only", "nonsense", "--out", str(tmp_path / "r")]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert main(["pipeline", "--preset", "huge", "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_every_preset_trains_its_task_reward_rl_stages_on_the_evaluated_rl_task():
    """The evaluation scores RL_TASK on 10x the examples as "the RL stages' own task": GRPO and PPO with the
    task reward must train on exactly that task in every preset, or the report's column would mislead."""
    for preset, flags in PIPELINE_PRESETS.items():
        for stage in ("grpo", "ppo_task"):
            argv = flags[stage]
            assert argv[argv.index("--tasks") + 1] == RL_TASK, (preset, stage)
