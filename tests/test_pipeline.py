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


def test_fixed_work_budget_gives_every_time_budgeted_stage_steps():
    """--budget steps: each stage the preset gives minutes gets its FIXED_WORK_STEPS instead (the last flag
    wins in argparse), so the work does not depend on the machine; --budget minutes leaves the preset as is."""
    import argparse

    from gptstack.pipeline import FIXED_WORK_STEPS, stage_flags

    minutes, steps = stage_flags("tiny", "minutes"), stage_flags("tiny", "steps")
    assert minutes == PIPELINE_PRESETS["tiny"]
    for name, flags in PIPELINE_PRESETS["tiny"].items():
        if "--minutes" in flags and float(flags[flags.index("--minutes") + 1]) > 0:
            assert name in FIXED_WORK_STEPS["tiny"], f"{name} is time-budgeted but has no fixed-work steps"
    for name, n in FIXED_WORK_STEPS["tiny"].items():
        p = argparse.ArgumentParser()
        p.add_argument("--minutes", type=float)
        p.add_argument("--steps", type=int)
        args, _ = p.parse_known_args(steps[name])
        assert args.steps == n and args.minutes == 0, name
    assert stage_flags("micro", "steps") == PIPELINE_PRESETS["micro"]   # already fixed work


def test_pipeline_budget_is_checked_and_not_mixed(tmp_path, capsys):
    root = tmp_path / "r"
    assert main(["pipeline", "--budget", "hours", "--out", str(root)]) == 2
    assert "--budget must be one of minutes, steps" in capsys.readouterr().err
    root.mkdir()
    (root / "pipeline.json").write_text(json.dumps({"budget": "minutes", "stages": {"base": {"status": "done"}}}))
    assert main(["pipeline", "--budget", "steps", "--out", str(root), "--only", "report"]) == 2
    err = capsys.readouterr().err
    assert "made with --budget minutes" in err and "\n" not in err.strip()


def test_corrupt_pipeline_record_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "r"
    root.mkdir()
    (root / "pipeline.json").write_text('{"preset": "tiny", "stag')
    assert main(["pipeline", "--out", str(root), "--only", "report"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pipeline.json' is corrupt" in err and "\n" not in err
    assert (root / "pipeline.json").read_text() == '{"preset": "tiny", "stag'   # nothing overwritten
