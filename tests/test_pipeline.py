"""The whole pipeline at micro scale (every stage through the library, a second run reuses everything, the
report built from the run directories), and presets as data: loaded, validated, inherited, budgeted."""

import json
import time
from pathlib import Path

import pytest

from gptstack.cli import main
from gptstack.errors import ConfigError
from gptstack.pipeline.presets import load_preset, preset_names


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
            assert t["task"] == load_preset("micro").rl_task and t["n"] == 30 and 0 <= t["greedy"] <= 1 and 0 <= t["sample"] <= 1
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


def _stage_configs(name, budget="minutes", **kw):
    from gptstack.config import PipelineConfig
    from gptstack.pipeline.run import _stage_configs
    from gptstack.pipeline.stages import STAGES

    preset = load_preset(name).with_budget(budget)
    cfg = PipelineConfig(preset=name, budget=budget, **kw)
    return preset, _stage_configs(preset, cfg, {s.name: Path("/r") / s.output for s in STAGES if s.output})


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_its_task_reward_rl_stages_train_on_the_evaluated_rl_task(name):
    """The evaluation scores the preset's rl_task on 10x the examples as "the RL stages' own task": GRPO and
    PPO with the task reward must train on exactly that task, or the report's column would mislead."""
    preset, configs = _stage_configs(name)
    for stage in ("grpo", "ppo_task"):
        assert configs[stage].tasks == preset.rl_task and configs[stage].reward == "task", (name, stage)
    assert configs["ppo"].reward == "rm:/r/rm" and configs["distill"].teacher == "/r/sft"
    for stage in ("base", "grpo", "ppo", "ppo_task", "distill", "prefs", "eval"):
        configs[stage].validate()   # (sft fills seq_len from its parent, rm/dpo need the pairs file first)


def test_presets_are_the_one_mechanism_for_the_cli_too():
    """`gptstack pretrain --preset tiny` and `sft --preset tiny [--lora]` read the pipeline's own sections."""
    from gptstack.cli import build_parser
    from gptstack.cli.flags import config_from_args
    from gptstack.cli.train import _preset_values
    from gptstack.config import PretrainConfig, SFTConfig

    tiny = load_preset("tiny")
    args = build_parser().parse_args(["pretrain", "--depth", "2"])
    cfg = config_from_args(PretrainConfig, args, _preset_values(args.preset, "base"))
    assert cfg.minutes == tiny.values("base")["minutes"] and cfg.depth == 2   # the flag beats the preset
    args = build_parser().parse_args(["sft", "runs/base", "--lora"])
    cfg = config_from_args(SFTConfig, args, _preset_values(args.preset, "sft_lora"))
    assert cfg.lora_rank == tiny.values("sft_lora")["lora_rank"] and "lm_head" in cfg.lora_targets


def test_fixed_work_budget_gives_every_time_budgeted_stage_steps():
    """--budget steps: each stage the preset gives minutes gets its [budget_steps] count and no time limit,
    so the work does not depend on the machine; --budget minutes leaves the preset as it is."""
    preset, minutes = _stage_configs("tiny", "minutes")
    _, steps = _stage_configs("tiny", "steps")
    for name, cfg in minutes.items():
        if getattr(cfg, "minutes", 0) > 0:
            assert name in preset.budget_steps, f"{name} is time-budgeted but has no fixed-work steps"
    for name, n in preset.budget_steps.items():
        assert steps[name].steps == n and steps[name].minutes == 0, name
    with pytest.raises(ConfigError, match="no \\[budget_steps\\]"):
        load_preset("micro").with_budget("steps")


@pytest.mark.parametrize("text, message", [
    ("[sft]\nminuts = 3\n", "unknown field 'minuts' for SFTConfig (did you mean 'minutes'?)"),
    ("[sfft]\nsteps = 3\n", "unknown section or key 'sfft' (did you mean 'sft'?)"),
    ("[rm]\nsteps = 'many'\n", "'steps' must be int"),
    ("[grpo]\nbatch_size = 8\n", "'batch_size' is not a setting of RLConfig"),
    ("rl_task = 'chess'\n", "rl_task 'chess' is not a task"),
    ("[budget_steps]\nprefs = 3\n", "'prefs' is not a training stage"),
    ("[sft\n", "is not valid TOML"),
])
def test_a_bad_preset_is_a_one_line_error_before_any_stage_runs(tmp_path, capsys, text, message):
    preset = tmp_path / "mine.toml"
    preset.write_text(text)
    root = tmp_path / "run"
    assert main(["pipeline", "--preset", str(preset), "--out", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not root.exists()   # nothing ran, nothing was written


def test_a_preset_can_inherit_and_override(tmp_path):
    (tmp_path / "mine.toml").write_text('inherits = "tiny"\n[sft]\nminutes = 1.5\n')
    mine, tiny = load_preset(str(tmp_path / "mine.toml")), load_preset("tiny")
    assert mine.values("sft")["minutes"] == 1.5 and mine.values("sft")["tasks"] == tiny.values("sft")["tasks"]
    assert mine.budget_steps == tiny.budget_steps and load_preset("d20").values("base")["depth"] == 20


def test_ctrl_c_in_a_stage_stops_cleanly_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    from gptstack.train import pretrain as pretrain_module

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "pretrain", interrupted)
    root = tmp_path / "run"
    assert main(["pipeline", "--preset", "micro", "--out", str(root), "--only", "base"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith("interrupted in stage base; rerun the same command to continue"), err
    assert json.loads((root / "pipeline.json").read_text())["stages"]["base"]["status"] == "interrupted"


def test_a_failing_stage_is_marked_failed_with_its_error(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    (root / "prefs.jsonl").write_text("not json\n")   # the reward model's data is broken
    (root / "sft").mkdir()
    assert main(["pipeline", "--preset", "micro", "--out", str(root), "--only", "rm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage rm failed" in err and "\n" not in err, err
    entry = json.loads((root / "pipeline.json").read_text())["stages"]["rm"]
    assert entry["status"] == "failed" and entry["error"]


def test_pipeline_budget_is_checked_and_not_mixed(tmp_path, capsys):
    root = tmp_path / "r"
    with pytest.raises(SystemExit):   # argparse refuses a value outside the field's documented choices
        main(["pipeline", "--budget", "hours", "--out", str(root)])
    assert "invalid choice: 'hours'" in capsys.readouterr().err
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
