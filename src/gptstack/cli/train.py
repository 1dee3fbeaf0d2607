"""Training and task commands: tokenizer, pretrain, sft, merge, eval, tasks, preferences, reward, rl, dpo,
distill, align-eval."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GptstackError
from .flags import add_config_flags, config_from_args


def cmd_tokenizer(args) -> None:
    from ..tokenizer import Tokenizer
    from ..runs import load_tokenizer

    if args.action == "train":
        from ..data.corpus import load_corpus
        import time

        docs = load_corpus(args.corpus)
        t0 = time.time()
        tok = Tokenizer.train((d.text for d in docs), args.vocab_size)
        tok.save(args.out)
        sample = "".join(d.text for d in docs[:3])[:200_000]
        print(f"trained {tok.vocab_size} tokens on {len(docs)} documents in {time.time() - t0:.1f}s -> {args.out}")
        print(f"compression: {tok.bytes_per_token(sample):.2f} bytes/token")
        return
    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else (open(args.file, encoding="utf-8").read() if args.file else None)
    if args.action == "encode":
        if text is None:
            raise GptstackError("give --text or --file to encode")
        ids = tok.encode(text)
        print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    else:  # info
        info = {"vocab_size": tok.vocab_size, "specials": len(tok.special_ids), "fingerprint": tok.fingerprint()}
        if text is not None:
            ids = tok.encode(text)
            info.update(tokens=len(ids), bytes=len(text.encode("utf-8")), bytes_per_token=round(tok.bytes_per_token(text), 3))
        print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))


def cmd_pretrain(args) -> None:
    from ..config import PretrainConfig
    from ..train.pretrain import pretrain, sample_texts

    from ..train.loop import is_main_process

    cfg = config_from_args(PretrainConfig, args, _preset_values(args.preset, "base"))
    result = pretrain(cfg)
    if not is_main_process():
        return
    last = result.last
    print(f"\ndone: {result.steps} steps, {result.tokens:,} tokens in {result.seconds / 60:.1f} min"
          + (f"; val bpb {last['val_bpb']:.4f}" if "val_bpb" in last else ""))
    from ..runs import load_model

    model, tok, _ = load_model(cfg.out)
    print("\nsamples:")
    for s in sample_texts(model, tok, max_tokens=64):
        print("  " + s.replace("\n", "\n  ") + "\n")


# ---- SFT commands: sft, merge, eval, tasks (train/sft.py, model/adapters.py, eval/tasks.py) ------------


def _preset_values(name: str | None, stage: str) -> dict:
    """A preset's settings for one stage (the same files the pipeline reads): presets/NAME.toml [stage]."""
    if not name:
        return {}
    from ..pipeline.presets import load_preset

    return load_preset(name).values(stage)


def cmd_sft(args) -> None:
    from ..config import SFTConfig
    from ..train.sft import sft

    stage = "sft_lora" if (args.lora or args.qlora) else "sft"
    cfg = config_from_args(SFTConfig, args, _preset_values(args.preset, stage))
    result = sft(args.run, cfg)
    last = result.last
    print(f"\ndone: {result.steps} steps, {result.tokens:,} trained tokens in {result.seconds / 60:.1f} min"
          + (f"; val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f" -> {cfg.out}")


def cmd_merge(args) -> None:
    from ..runs import merge_run

    out = merge_run(args.run, args.out)
    print(f"merged the adapter of {args.run} into its base weights -> {out}")


def cmd_eval(args) -> None:
    from ..devices import resolve_device
    from ..eval.tasks import evaluate_tasks, format_table
    from ..runs import load_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    model, tok, _ = load_model(args.run, resolve_device(args.device))
    if args.tools:   # the tool tasks, with and without their tools (eval/tools.py)
        from ..eval.tools import evaluate_tool_tasks, format_tool_table

        arms = [a.strip() for a in args.tools.split(",") if a.strip()]
        result = evaluate_tool_tasks(model, tok, args.tasks, args.n_examples, arms=arms, seed=args.seed,
                                     max_steps=args.max_steps, max_tokens=args.max_new_tokens,
                                     workdir=args.tool_dir, progress=not args.quiet)
        title = f"tool-task accuracy of {args.run} (test split)"
        text = format_tool_table(result, title=title)
    else:
        result = evaluate_tasks(model, tok, args.tasks, args.n_examples, modes=modes, seed=args.seed,
                                temperature=args.temperature, samples=args.samples, batch_size=args.batch_size,
                                max_tokens=args.max_new_tokens, progress=not args.quiet)
        text = format_table(result, title=f"task accuracy of {args.run} (test split)")
    result["run"] = args.run
    print(text)
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


def cmd_tasks(args) -> None:
    from ..data.tasks import get_task, list_tasks

    if args.action == "list":
        for name in list_tasks(opt_in=True):   # opt-in tasks (the tool tasks) are used only when named
            print(f"{name:<20} {get_task(name).DESCRIPTION}")
        return
    if not args.name:
        raise GptstackError(f"'gptstack tasks {args.action}' needs a task name; see 'gptstack tasks list'")
    task = get_task(args.name)
    examples = task.generate(args.split, args.n_examples if args.action == "generate" else min(args.n_examples, 3), args.seed)
    if args.action == "show":
        print(f"{task.NAME}: {task.DESCRIPTION}")
        for e in examples:
            print("\n" + "\n".join(f"[{m['role']}] {m['content']}" + "".join(
                f"<call {c['function']['name']}({c['function']['arguments']})>" for c in m.get("tool_calls") or ())
                for m in e.messages) + f"\n(answer: {e.answer})")
        return
    lines = "".join(json.dumps({**e.conversation(), "answer": e.answer, "task": e.task}) + "\n" for e in examples)
    if args.out in (None, "-"):
        sys.stdout.write(lines)
    else:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(lines)
        print(f"wrote {len(examples)} {args.split} examples of {task.NAME} -> {args.out}")


def register_train_commands(sub) -> None:
    from ..config import PretrainConfig, SFTConfig
    from ..pipeline.presets import preset_names

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer, encode text, or report compression")
    p.add_argument("action", choices=["train", "encode", "info"], help="train a tokenizer, encode text, or report its size and compression")
    p.add_argument("tokenizer", nargs="?", default=None, help="tokenizer dir or run dir (encode/info)")
    p.add_argument("--corpus", default="shakespeare", help="train: the text (as for gptstack pretrain)")
    p.add_argument("--vocab-size", type=int, default=8192, help="train: tokens in the vocabulary")
    p.add_argument("--out", default="runs/tokenizer", help="train: the tokenizer directory to write")
    p.add_argument("--text", default=None, help="encode/info: this text")
    p.add_argument("--file", default=None, help="encode/info: the text of this file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain a GPT on a corpus (default: Shakespeare)")
    p.add_argument("--preset", default="tiny", metavar="NAME",
                   help=f"fill unset flags from a preset's [base] section: {', '.join(preset_names())}, or a .toml "
                        "file (default: tiny)")
    add_config_flags(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised finetuning (full, LoRA or QLoRA) of a pretrained run on conversations")
    p.add_argument("run", help="the run to start from (e.g. runs/base)")
    p.add_argument("--preset", default="tiny", metavar="NAME",
                   help="fill unset flags from a preset's [sft] section ([sft_lora] with --lora/--qlora): "
                        f"{', '.join(preset_names())}, or a .toml file (default: tiny)")
    add_config_flags(p, SFTConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge", help="fold a LoRA adapter run into its base weights (a normal run directory)")
    p.add_argument("run", help="the LoRA run")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="task accuracy on the test split (greedy and sampled)")
    p.add_argument("run", help="the run to evaluate")
    p.add_argument("--tasks", default="all", help="'all' or a comma-separated list (see 'gptstack tasks list')")
    p.add_argument("--n-examples", type=int, default=100, help="test examples per task")
    p.add_argument("--modes", default="greedy,sample", help="comma-separated: greedy, sample, maj@K, ...")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled modes")
    p.add_argument("--samples", type=int, default=1, help="samples per example in 'sample' mode (pass@1 averaged)")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=0,
                   help="the longest reply, in new tokens; 0: per task, twice the longest reference")
    p.add_argument("--batch-size", type=int, default=64, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0, help="random seed of the test examples and the sampling")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full result (with example completions) here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tools", default=None, metavar="ARMS",
                   help="evaluate tool tasks (--tasks tool_multiply,tool_facts) under these comma-separated arms: "
                        "no_tools, tools (agent loop, constrained calls), tools_unconstrained")
    p.add_argument("--max-steps", type=int, default=4, help="with --tools: model turns per problem in the agent loop")
    p.add_argument("--tool-dir", default="runs/tool_eval", help="with --tools: where the search index of tool_facts is built")
    p.set_defaults(func=cmd_eval)
    _register_align_commands(sub)

    p = sub.add_parser("tasks", help="the synthetic task suite: list, show examples, or write them as JSONL")
    p.add_argument("action", choices=["list", "show", "generate"], help="list the tasks, show a few examples, or write examples as JSONL")
    p.add_argument("name", nargs="?", default=None, help="the task (see 'gptstack tasks list')")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which split's examples")
    p.add_argument("--n-examples", "--n", dest="n_examples", type=int, default=100, help="examples to write (show: at most 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="JSONL file (default: stdout)")
    p.set_defaults(func=cmd_tasks)


# ---- alignment commands: preferences, reward, rl, dpo, distill (train/reward_model.py, rl.py, dpo.py, distill.py)


def _print_last(result, keys) -> None:
    last = result.last
    shown = "  ".join(f"{k} {last[k]:.4f}" for k in keys if k in last)
    print(f"\ndone: {result.steps} steps in {result.seconds / 60:.1f} min" + (f"; {shown}" if shown else ""))


def cmd_preferences(args) -> None:
    from ..config import PreferencesConfig
    from ..train.reward_model import build_preferences

    cfg = config_from_args(PreferencesConfig, args)
    _, stats = build_preferences(args.run, cfg)
    print(f"{stats['prompts']} prompts x {cfg.samples} samples (mean task score "
          f"{stats['mean_score']:.3f}): {stats['pairs']} pairs, {stats['ties']} prompts skipped (all replies "
          f"tied) -> {cfg.out}")


def cmd_reward(args) -> None:
    from ..config import RewardConfig
    from ..train.reward_model import train_reward

    result = train_reward(args.run, config_from_args(RewardConfig, args))
    _print_last(result, ("val_accuracy", "val_margin", "val_loss", "accuracy"))


def cmd_rl(args) -> None:
    from ..config import RLConfig
    from ..train.rl import train_rl

    result = train_rl(args.run, config_from_args(RLConfig, args))
    _print_last(result, ("reward", "task_accuracy", "kl", "entropy", "eval_accuracy"))


def cmd_dpo(args) -> None:
    from ..config import DPOConfig
    from ..train.dpo import train_dpo

    result = train_dpo(args.run, config_from_args(DPOConfig, args))
    _print_last(result, ("val_accuracy", "val_reward_margin", "val_reward_chosen", "val_reward_rejected"))


def cmd_distill(args) -> None:
    from ..config import DistillConfig
    from ..train.distill import compare_distillation, distill

    cfg = config_from_args(DistillConfig, args)
    if cfg.mode != "compare":
        result = distill(args.run, cfg)
        _print_last(result, ("loss", "reverse_kl", "task_accuracy", "eval_accuracy"))
        return
    report = compare_distillation(args.run, cfg)
    print(f"\n{'model':<10} {'greedy acc':>10} {'sampled acc':>11} {'KL to student':>13} {'entropy':>8} {'train s':>8}")
    for name, r in report.items():
        print(f"{name:<10} {r['accuracy']:>10.3f} {r['sample_accuracy']:>11.3f} {r.get('kl_to_ref', 0.0):>13.3f} "
              f"{r['entropy']:>8.3f} {r.get('train_seconds', float('nan')):>8.1f}")
    print(f"-> {cfg.out}/compare.json")


def cmd_align_eval(args) -> None:
    """Held-out greedy accuracy, mean policy entropy and KL to a reference for each run: the alignment table."""
    from ..devices import resolve_device
    from ..runs import load_model
    from ..train.rl import evaluate_policy, task_examples

    device = resolve_device(args.device)
    ref = load_model(args.ref, device)[0] if args.ref else None
    examples = task_examples(args.tasks, "test", args.n_examples, args.seed, per_task=True)
    rows = {}
    for run in args.runs:
        model, tok, _ = load_model(run, device)
        rows[run] = evaluate_policy(model, tok, examples, ref, args.max_new_tokens, args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'run':<28} {'greedy acc':>10} {'sampled acc':>11} {'KL to ref':>10} {'entropy':>8}  greedy per task")
    for run, r in rows.items():
        per = "  ".join(f"{k[4:]} {v:.3f}" for k, v in r.items() if k.startswith("acc_"))
        print(f"{run:<28} {r['accuracy']:>10.3f} {r['sample_accuracy']:>11.3f} {r.get('kl_to_ref', float('nan')):>10.3f} "
              f"{r['entropy']:>8.3f}  {per}")


def _register_align_commands(sub) -> None:
    from ..config import DistillConfig, DPOConfig, PreferencesConfig, RewardConfig, RLConfig

    p = sub.add_parser("preferences", help="sample K replies per task prompt and rank them into preference pairs")
    p.add_argument("run", help="the (SFT) run to sample from")
    add_config_flags(p, PreferencesConfig)
    # the flag's earlier name, kept so existing scripts run (one name now: --samples, as in rl and distill)
    p.add_argument("--samples-per-prompt", dest="samples", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_preferences)

    for name, cls, func, help_ in (
            ("reward", RewardConfig, cmd_reward, "train a reward model (Bradley-Terry) on preference pairs"),
            ("rl", RLConfig, cmd_rl, "PPO or GRPO on task prompts with composed rewards (task, rm:, semantic, teacher:)"),
            ("dpo", DPOConfig, cmd_dpo, "direct preference optimisation (sigmoid or IPO) against a frozen reference"),
            ("distill", DistillConfig, cmd_distill, "distil a teacher into a student, offline or on-policy")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run", help="the run to start from (the student, for distill)")
        add_config_flags(p, cls)
        p.set_defaults(func=func)

    p = sub.add_parser("align-eval", help="held-out task accuracy, KL to a reference and entropy of runs")
    p.add_argument("runs", nargs="+", help="the runs to compare")
    p.add_argument("--ref", default="", help="reference run for the KL column (usually the SFT run)")
    p.add_argument("--tasks", default="extraction,spelling", help="tasks whose held-out prompts are scored")
    p.add_argument("--n-examples", "--n", dest="n_examples", type=int, default=48, help="held-out prompts per task")
    p.add_argument("--max-new-tokens", type=int, default=40, help="the longest reply, in new tokens")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_align_eval)



