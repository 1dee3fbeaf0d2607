"""The `gptstack` command: one subcommand per stage, parse -> config -> library call -> print.

Commands live by area: train.py (tokenizer, pretrain, sft, merge, preferences, reward, rl, dpo, distill,
eval, tasks, align-eval), infer.py (sample, bpb, chat, generate, index), pipeline.py (pipeline, report), serve.py (serve),
hub.py (import, export).
Each parses its flags into the stage's config dataclass (flags come from the fields, with their help) and
calls the library. Handlers import what they need when they run, so `gptstack --help` imports no torch.
Every GptstackError is printed on one line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import GptstackError, Interrupted

from .datamap import register_datamap_commands
from .data import register_data_commands
from .hub import register_hub_commands
from .infer import register_infer_commands
from .pipeline import register_pipeline_commands
from .serve import register_serve_commands
from .train import register_train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptstack", description="Make a GPT assistant end to end: tokenizer, "
                                     "pretraining, SFT, reward model, RLHF/DPO, inference, evaluation report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_train_commands(sub)
    register_infer_commands(sub)
    register_pipeline_commands(sub)
    register_serve_commands(sub)
    register_hub_commands(sub)
    register_data_commands(sub)
    register_datamap_commands(sub)
    for command in sub.choices.values():   # one flag, every command (threads are per process)
        command.add_argument("--threads", type=int, default=None, metavar="N",
                             help="torch threads (default: one per core, or $GPTSTACK_THREADS); fewer when other "
                                  "processes share the cores, which otherwise slows steps several times")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None or os.environ.get("GPTSTACK_THREADS"):
            from ..devices import set_threads

            set_threads(args.threads or 0)
        args.func(args)
    except Interrupted as e:
        print(f"gptstack {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except GptstackError as e:
        print(f"gptstack {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:   # what was saved stays saved (training stages checkpoint on Ctrl-C)
        print(f"gptstack {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
