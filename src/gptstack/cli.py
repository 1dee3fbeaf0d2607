"""The `gptstack` command: one subcommand per stage.

Each subcommand parses its flags into the stage's config dataclass (flags map 1:1 to fields, `--preset`
fills the rest) and calls the library. Heavy imports happen inside the handlers so `gptstack --help` starts
fast. Every GptstackError is printed on one line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from .errors import GptstackError

# ---- dataclass <-> flags ---------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field, typed from the field's default; defaults are left None so we can tell
    which fields the user set (presets fill only the others)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        typ = hints.get(f.name, str)
        if typ is bool or isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                               help=f"(default: {default})")
        else:
            conv = {int: int, float: float}.get(type(default), str)
            group.add_argument(_flag(f.name), dest=f.name, default=None, type=conv, metavar=type(default).__name__.upper(),
                               help=f"(default: {default})")


def config_from_args(cls, args: argparse.Namespace, preset: str | None = None, **fixed):
    from .config import apply_preset

    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                if getattr(args, f.name, None) is not None}
    explicit.update(fixed)
    cfg = cls(**explicit)
    if preset:
        cfg = apply_preset(cfg, preset, set(explicit))
    return cfg


# ---- handlers ---------------------------------------------------------------------------------------------


def cmd_tokenizer(args) -> None:
    from .tokenizer import Tokenizer
    from .train.checkpoint import load_tokenizer

    if args.action == "train":
        from .data.corpus import load_corpus
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
    from .config import PretrainConfig
    from .train.pretrain import pretrain, sample_texts

    from .train.loop import is_main_process

    cfg = config_from_args(PretrainConfig, args, args.preset)
    result = pretrain(cfg)
    if not is_main_process():
        return
    last = result.last
    print(f"\ndone: {result.steps} steps, {result.tokens:,} tokens in {result.seconds / 60:.1f} min"
          + (f"; val bpb {last['val_bpb']:.4f}" if "val_bpb" in last else ""))
    from .train.checkpoint import load_model

    model, tok, _ = load_model(cfg.out)
    print("\nsamples:")
    for s in sample_texts(model, tok, max_tokens=64):
        print("  " + s.replace("\n", "\n  ") + "\n")


def _sampling_params(args):
    from .infer.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          max_tokens=args.max_tokens, seed=args.seed, stop=list(args.stop or []),
                          repetition_penalty=args.repetition_penalty, n=getattr(args, "n", 1) or 1)


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=200)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--device", default="auto")


def cmd_sample(args) -> None:
    from .config import resolve_device
    from .errors import PromptError
    from .infer.engine import Engine
    from .train.checkpoint import load_model

    model, tok, _ = load_model(args.run, resolve_device(args.device))
    if not args.prompt:
        raise PromptError("--prompt is empty: give some text to continue")
    engine = Engine(model, tok)
    ids = tok.encode(args.prompt, bos=True)
    params = _sampling_params(args)
    params.stop_token_ids = [tok.bos_id]
    sys.stdout.write(args.prompt)
    for delta in engine.stream(ids, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_bpb(args) -> None:
    from .config import resolve_device
    from .eval.bpb import bpb_of_texts, read_texts
    from .train.checkpoint import load_model

    texts = read_texts(args.files)
    model, tok, _ = load_model(args.run, resolve_device(args.device))
    result = bpb_of_texts(model, tok, texts)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"bits per byte: {result['val_bpb']:.4f}   ({result['tokens']:,} tokens, {result['bytes']:,} bytes, "
              f"loss {result['val_loss']:.4f} nats/token)")


# ---- SFT commands: sft, merge, eval, tasks (train/sft.py, model/adapters.py, eval/tasks.py) ------------


def register_sft_commands(sub) -> None:
    pass


# ---- alignment commands: preferences, reward, rl, dpo, distill (train/reward.py, rl.py, dpo.py, distill.py)


def _print_last(result, keys) -> None:
    last = result.last
    shown = "  ".join(f"{k} {last[k]:.4f}" for k in keys if k in last)
    print(f"\ndone: {result.steps} steps in {result.seconds / 60:.1f} min" + (f"; {shown}" if shown else ""))


def cmd_preferences(args) -> None:
    from .train.reward import build_preferences

    _, stats = build_preferences(args.run, args.tasks, args.samples_per_prompt, args.n_prompts, args.out,
                                 args.temperature, args.max_new_tokens, args.seed, device=args.device)
    print(f"{stats['prompts']} prompts x {args.samples_per_prompt} samples (mean task score "
          f"{stats['mean_score']:.3f}): {stats['pairs']} pairs, {stats['ties']} prompts skipped (all replies "
          f"tied) -> {args.out}")


def cmd_reward(args) -> None:
    from .train.reward import RewardConfig, train_reward

    result = train_reward(args.run, config_from_args(RewardConfig, args))
    _print_last(result, ("val_accuracy", "val_margin", "val_loss", "accuracy"))


def cmd_rl(args) -> None:
    from .train.rl import RLConfig, train_rl

    result = train_rl(args.run, config_from_args(RLConfig, args))
    _print_last(result, ("reward", "task_accuracy", "kl", "entropy", "eval_accuracy"))


def cmd_dpo(args) -> None:
    from .train.dpo import DPOConfig, train_dpo

    result = train_dpo(args.run, config_from_args(DPOConfig, args))
    _print_last(result, ("val_accuracy", "val_reward_margin", "val_reward_chosen", "val_reward_rejected"))


def cmd_distill(args) -> None:
    from .train.distill import DistillConfig, distill

    result = distill(args.run, config_from_args(DistillConfig, args))
    _print_last(result, ("loss", "reverse_kl", "task_accuracy", "eval_accuracy"))


def cmd_align_eval(args) -> None:
    """Held-out greedy accuracy, mean policy entropy and KL to a reference for each run: the alignment table."""
    from .config import resolve_device
    from .train.checkpoint import load_model
    from .train.rl import evaluate_policy, task_examples

    device = resolve_device(args.device)
    ref = load_model(args.ref, device)[0] if args.ref else None
    n_tasks = len(args.tasks.split(","))
    examples = task_examples(args.tasks, "test", args.n * n_tasks, args.seed)
    rows = {}
    for run in args.runs:
        model, tok, _ = load_model(run, device)
        rows[run] = evaluate_policy(model, tok, examples, ref, args.max_new_tokens, args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'run':<28} {'accuracy':>9} {'KL to ref':>10} {'entropy':>8}  per task")
    for run, r in rows.items():
        per = "  ".join(f"{k[4:]} {v:.3f}" for k, v in r.items() if k.startswith("acc_"))
        print(f"{run:<28} {r['accuracy']:>9.3f} {r.get('kl_to_ref', float('nan')):>10.3f} {r['entropy']:>8.3f}  {per}")


def register_align_commands(sub) -> None:
    from .train.distill import DistillConfig
    from .train.dpo import DPOConfig
    from .train.reward import RewardConfig
    from .train.rl import RLConfig

    p = sub.add_parser("preferences", help="sample K replies per task prompt and rank them into preference pairs")
    p.add_argument("run", help="the (SFT) run to sample from")
    p.add_argument("--tasks", default="arithmetic_direct,spelling")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="preference JSONL to write")
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
    p.add_argument("runs", nargs="+")
    p.add_argument("--ref", default="", help="reference run for the KL column (usually the SFT run)")
    p.add_argument("--tasks", default="arithmetic_direct,spelling")
    p.add_argument("--n", type=int, default=64, help="held-out prompts per task")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_align_eval)


# ---- inference commands: chat, generate, index (infer/) ----------------------------------------------------


def register_infer_commands(sub) -> None:
    pass


# ---- pipeline commands: pipeline, report (pipeline.py, eval/report.py) -------------------------------------


def register_pipeline_commands(sub) -> None:
    pass


# ---- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS, PretrainConfig

    parser = argparse.ArgumentParser(prog="gptstack", description="Make a GPT assistant end to end: tokenizer, "
                                     "pretraining, SFT, reward model, RLHF/DPO, inference, serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer, encode text, or report compression")
    p.add_argument("action", choices=["train", "encode", "info"])
    p.add_argument("tokenizer", nargs="?", default=None, help="tokenizer dir or run dir (encode/info)")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", default="runs/tokenizer")
    p.add_argument("--text", default=None)
    p.add_argument("--file", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain a GPT on a corpus (default: Shakespeare)")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    add_config_flags(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="continue a prompt with a model, streaming")
    p.add_argument("run")
    p.add_argument("--prompt", required=True)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bpb", help="bits per byte of text files under a model")
    p.add_argument("run")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bpb)

    register_sft_commands(sub)
    register_align_commands(sub)
    register_infer_commands(sub)
    register_pipeline_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GptstackError as e:
        print(f"gptstack {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
