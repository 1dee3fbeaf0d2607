"""The main job's commands: pipeline, report."""

from __future__ import annotations

from .flags import add_config_flags, config_from_args


def cmd_report(args) -> None:
    from ..pipeline.report import build_report

    path = build_report(args.run_root)
    print(f"report: {path}  (also report.md, report.json)")


def cmd_pipeline(args) -> None:
    from ..config import PipelineConfig
    from ..pipeline.run import run_pipeline

    from ..train.loop import is_main_process

    report = run_pipeline(config_from_args(PipelineConfig, args))
    if report.exists() and is_main_process():   # under torchrun: rank 0 says it once
        print(f"open {report.resolve()}")


def register_pipeline_commands(sub) -> None:
    from ..config import PipelineConfig

    p = sub.add_parser("pipeline", help="run every stage (tokenizer -> pretrain -> SFT -> RM -> RL/DPO -> eval -> "
                       "report); finished stages are reused")
    add_config_flags(p, PipelineConfig, title="pipeline (stages: base, sft, sft_lora, prefs, rm, grpo, ppo, "
                                              "ppo_task, dpo, distill, eval, report)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("report", help="rebuild the HTML/Markdown/JSON report of a pipeline run from its directories")
    p.add_argument("run_root", help="the pipeline's output directory (RUN_ROOT)")
    p.set_defaults(func=cmd_report)
