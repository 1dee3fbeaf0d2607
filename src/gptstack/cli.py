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

from .errors import ConfigError, GptstackError

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
    from .devices import resolve_device
    from .errors import PromptError
    from .infer.engine import Engine
    from .model.quant import load_quantized

    if not args.prompt:
        raise PromptError("--prompt is empty: give some text to continue")
    model, tok, _ = load_quantized(args.run, resolve_device(args.device), args.quantize)
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
    from .devices import resolve_device
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


def cmd_sft(args) -> None:
    from .config import SFTConfig, apply_sft_preset
    from .train.sft import sft

    explicit = {f.name for f in dataclasses.fields(SFTConfig) if getattr(args, f.name, None) is not None}
    cfg = config_from_args(SFTConfig, args)
    if args.preset:
        cfg = apply_sft_preset(cfg, args.preset, explicit)
    result = sft(args.run, cfg)
    last = result.last
    print(f"\ndone: {result.steps} steps, {result.tokens:,} trained tokens in {result.seconds / 60:.1f} min"
          + (f"; val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f" -> {cfg.out}")


def cmd_merge(args) -> None:
    from .model.adapters import merge_run

    out = merge_run(args.run, args.out)
    print(f"merged the adapter of {args.run} into its base weights -> {out}")


def cmd_eval(args) -> None:
    from .devices import resolve_device
    from .eval.tasks import evaluate_tasks, format_table
    from .train.checkpoint import load_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    model, tok, _ = load_model(args.run, resolve_device(args.device))
    result = evaluate_tasks(model, tok, args.tasks, args.n_examples, modes=modes, seed=args.seed,
                            temperature=args.temperature, samples=args.samples, batch_size=args.batch_size,
                            max_tokens=args.max_tokens, progress=not args.quiet)
    result["run"] = args.run
    print(format_table(result, title=f"task accuracy of {args.run} (test split)"))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


def cmd_tasks(args) -> None:
    from .data.tasks import get_task, list_tasks

    if args.action == "list":
        for name in list_tasks():
            print(f"{name:<20} {get_task(name).DESCRIPTION}")
        return
    if not args.name:
        raise GptstackError(f"'gptstack tasks {args.action}' needs a task name; see 'gptstack tasks list'")
    task = get_task(args.name)
    examples = task.generate(args.split, args.n if args.action == "generate" else min(args.n, 3), args.seed)
    if args.action == "show":
        print(f"{task.NAME}: {task.DESCRIPTION}")
        for e in examples:
            print("\n" + "\n".join(f"[{m['role']}] {m['content']}" for m in e.messages) + f"\n(answer: {e.answer})")
        return
    lines = "".join(json.dumps({"messages": e.messages, "answer": e.answer, "task": e.task}) + "\n" for e in examples)
    if args.out in (None, "-"):
        sys.stdout.write(lines)
    else:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(lines)
        print(f"wrote {len(examples)} {args.split} examples of {task.NAME} -> {args.out}")


def register_sft_commands(sub) -> None:
    from .config import SFT_PRESETS, SFTConfig

    p = sub.add_parser("sft", help="supervised finetuning (full, LoRA or QLoRA) of a pretrained run on conversations")
    p.add_argument("run", help="the run to start from (e.g. runs/base)")
    p.add_argument("--preset", choices=list(SFT_PRESETS), default="tiny")
    add_config_flags(p, SFTConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge", help="fold a LoRA adapter run into its base weights (a normal run directory)")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="task accuracy on the test split (greedy and sampled)")
    p.add_argument("run")
    p.add_argument("--tasks", default="all", help="'all' or a comma-separated list (see 'gptstack tasks list')")
    p.add_argument("--n-examples", type=int, default=100)
    p.add_argument("--modes", default="greedy,sample", help="comma-separated: greedy, sample, maj@K, ...")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--samples", type=int, default=1, help="samples per example in 'sample' mode (pass@1 averaged)")
    p.add_argument("--max-tokens", type=int, default=0, help="0: per task, twice the longest reference")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the full result (with example completions) here")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tasks", help="the synthetic task suite: list, show examples, or write them as JSONL")
    p.add_argument("action", choices=["list", "show", "generate"])
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSONL file (default: stdout)")
    p.set_defaults(func=cmd_tasks)


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
    from .train.distill import DistillConfig, compare_distillation, distill

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
    from .devices import resolve_device
    from .train.checkpoint import load_model
    from .train.rl import evaluate_policy, task_examples

    device = resolve_device(args.device)
    ref = load_model(args.ref, device)[0] if args.ref else None
    examples = task_examples(args.tasks, "test", args.n, args.seed, per_task=True)
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


def register_align_commands(sub) -> None:
    from .config import DistillConfig, DPOConfig, RewardConfig, RLConfig

    p = sub.add_parser("preferences", help="sample K replies per task prompt and rank them into preference pairs")
    p.add_argument("run", help="the (SFT) run to sample from")
    p.add_argument("--tasks", default="extraction,spelling")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=40)
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
    p.add_argument("--tasks", default="extraction,spelling")
    p.add_argument("--n", type=int, default=48, help="held-out prompts per task")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_align_eval)


# ---- inference commands: chat, generate, index (infer/) ----------------------------------------------------


def _load_engine(args):
    """Model (optionally quantized), tokenizer and engine for chat/generate."""
    from .devices import resolve_device
    from .infer.engine import Engine
    from .model.quant import load_quantized

    speculate = _speculate_flag(args)   # before loading: a bad flag should not wait for the model
    model, tok, _ = load_quantized(args.run, resolve_device(args.device), getattr(args, "quantize", None))
    engine = Engine(model, tok)
    engine.speculate = speculate
    return engine, tok


def _speculate_flag(args) -> int:
    """--speculate K, checked: drafts are verified against the greedy choice of one sequence with no logit
    hooks, so anything else is an error rather than a silently ignored flag."""
    speculate = getattr(args, "speculate", 0) or 0
    if speculate < 0:
        raise ConfigError(f"--speculate must be 0 (off) or a number of draft tokens, got {speculate}")
    if speculate:
        why = ("chat" if args.func is cmd_chat else
               f"--temperature {args.temperature}" if args.temperature != 0 else
               "--n > 1" if (getattr(args, "n", 1) or 1) > 1 else
               "--best-of" if getattr(args, "best_of", 0) else
               "a grammar (--json-schema/--regex/--grammar)" if any(getattr(args, k, None) for k in
                                                                    ("json_schema", "regex", "grammar")) else
               "--mix-base" if getattr(args, "mix_base", None) else "")
        if why:
            raise ConfigError(f"--speculate verifies drafts against greedy decoding of one sequence "
                              f"(generate, --temperature 0, --n 1, no grammar or mixing); not with {why}")
    return speculate


def _infer_hooks(args, engine) -> list:
    if not getattr(args, "mix_base", None):
        return []
    from .infer.mixing import load_mixing_hook

    return [load_mixing_hook(args.mix_base, args.mix_weight, args.mix_mode, engine)]


def _load_index(args):
    if not getattr(args, "retrieve", None):
        return None
    from .infer.retrieval import Index

    return Index.load(args.retrieve, embedder=args.embedder)


def _augment(index, text: str, k: int) -> str:
    if index is None:
        return text
    from .infer.retrieval import augment

    return augment(text, index.search(text, k))


def _add_infer_flags(p) -> None:
    add_sampling_flags(p)
    g = p.add_argument_group("inference")
    g.add_argument("--quantize", choices=["int8", "bnb8", "nf4"], default=None, help="low-precision weights")
    g.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="generate with --temperature 0 and one sample: verify up to K prompt-lookup draft tokens "
                        "per pass (same output as plain greedy; pays off on text that repeats or copies its prompt)")
    g.add_argument("--retrieve", metavar="INDEX", default=None, help="retrieve passages from this index into the prompt")
    g.add_argument("--top-k-passages", "--passages", dest="passages", type=int, default=3, metavar="K",
                   help="passages to retrieve (with --retrieve)")
    g.add_argument("--embedder", choices=["minilm", "bm25"], default=None,
                   help="embedder the index must have been built with (default: whichever it was)")
    g.add_argument("--mix-base", metavar="RUN_DIR", default=None, help="mix in this base model's distribution")
    g.add_argument("--mix-weight", type=float, default=0.3)
    g.add_argument("--mix-mode", choices=["fixed", "entropy"], default="fixed")


def cmd_chat(args) -> None:
    from dataclasses import replace

    from .errors import PromptError

    engine, tok = _load_engine(args)
    hooks, index = _infer_hooks(args, engine), _load_index(args)
    params = replace(_sampling_params(args), n=1)
    S = tok.special_ids
    end = tok.assistant_end_id
    system: list[str] = [args.system or ""]
    turns: list[list[int]] = []        # each: user segment + reply + <|assistant_end|>
    session = engine.session()
    reserve = min(params.max_tokens, engine.max_context // 4)
    interactive = args.prompt is None and sys.stdin.isatty()

    def notice(msg: str) -> None:
        print(f"[{msg}]", file=sys.stderr if args.prompt is not None else sys.stdout, flush=True)

    def head() -> list[int]:
        ids = [tok.bos_id]
        if system[0]:
            ids += [S["<|system_start|>"]] + tok.encode(system[0]) + [S["<|system_end|>"]]
        return ids

    def rebuild(extra: list[int]) -> None:
        """Re-prefill (only on /system and when the context is full), first dropping the oldest turns until
        the history, `extra` and room for a reply fit (a longer system prompt can overflow it too)."""
        dropped = 0
        while turns and len(head()) + sum(map(len, turns)) + len(extra) + reserve > engine.max_context:
            turns.pop(0)
            dropped += 1
        if dropped:
            notice(f"context full: dropped the {dropped} oldest turn(s)")
        session.reset()
        session.append(head() + [t for turn in turns for t in turn] + extra)

    def turn(text: str) -> None:
        if not text.strip():
            raise PromptError("the message is empty")
        seg = [S["<|user_start|>"]] + tok.encode(_augment(index, text, args.passages)) + [S["<|user_end|>"],
                                                                                          S["<|assistant_start|>"]]
        if len(head()) + len(seg) + reserve > engine.max_context:
            raise PromptError(f"the message ({len(seg)} tokens) does not fit the {engine.max_context}-token "
                              "context with room for a reply; shorten it")
        if not session.tokens:
            session.append(head())
        if session.free < len(seg) + reserve:
            rebuild(seg)
        else:
            session.append(seg)
        start = len(session.tokens)
        reply = session.generate(params, on_delta=lambda d: (sys.stdout.write(d), sys.stdout.flush()), hooks=hooks)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if session.tokens[-1] != end:   # stopped by a string, the budget or another stop token: close the turn
            session.truncate(start + len(reply.tokens))
            session.append([end])
        turns.append(seg + session.tokens[start:])

    if args.prompt is not None:
        turn(args.prompt)
        return
    if interactive:
        print("gptstack chat — /reset, /system TEXT, /temp T, /quit", flush=True)
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/reset":
                turns.clear()
                session.reset()
                notice("conversation reset")
            elif cmd == "/system":
                previous, system[0] = system[0], rest.strip()
                if len(head()) + reserve > engine.max_context:
                    system[0] = previous
                    notice(f"error: that system prompt leaves no room for a reply in the {engine.max_context}-token "
                           "context; kept the previous one")
                    continue
                rebuild([])
                notice(f"system prompt {'set' if system[0] else 'cleared'}")
            elif cmd == "/temp":
                try:
                    params = replace(params, temperature=float(rest))
                    params.validate()
                    notice(f"temperature {params.temperature}")
                except (ValueError, GptstackError):
                    notice("usage: /temp T with T >= 0")
            else:
                notice(f"unknown command {cmd}; commands: /reset /system TEXT /temp T /quit")
            continue
        try:
            turn(line)
        except GptstackError as e:
            notice(f"error: {e}")


def cmd_generate(args) -> None:
    from dataclasses import replace

    from .errors import CheckpointError, ConfigError, PromptError

    if args.prompt is None or not args.prompt.strip():
        raise PromptError("--prompt is empty: give some text")
    grammar_args = [a for a in ("json_schema", "regex", "grammar") if getattr(args, a)]
    if len(grammar_args) > 1:
        raise ConfigError("give at most one of --json-schema, --regex, --grammar")
    for flag, k in (("--n", args.n), ("--best-of", args.best_of)):
        if k is not None and k < 1:
            raise ConfigError(f"{flag} must be at least 1, got {k}")
    if args.vote and not args.n:
        raise ConfigError("--vote TASK needs --n K (the samples to vote over)")
    if args.best_of and not args.reward:
        raise ConfigError("--best-of K needs --reward rm:RUN_DIR")
    if args.reward and not args.reward.startswith("rm:"):
        raise ConfigError(f"--reward must look like rm:RUN_DIR, got {args.reward!r}")
    reward_dir = args.reward[3:] if args.reward else None
    if reward_dir is not None and not os.path.isdir(reward_dir):
        raise CheckpointError(f"reward model run '{reward_dir}' does not exist; train one with `gptstack reward`")
    task = None
    if args.vote:
        from .data.tasks import get_task
        task = get_task(args.vote)
    index = _load_index(args)
    engine, tok = _load_engine(args)
    grammar = None
    if grammar_args:   # compiled (and checked) before anything is generated
        from .infer.constrained import compile_grammar

        def read(path, what):
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read()
            except OSError as e:
                raise ConfigError(f"cannot read the {what} file '{path}' ({e.strerror})") from None

        grammar = compile_grammar(json_schema=read(args.json_schema, "JSON schema") if args.json_schema else None,
                                  regex=args.regex, lark=read(args.grammar, "grammar") if args.grammar else None,
                                  tokenizer=tok)
    text = _augment(index, args.prompt, args.passages)
    chat = args.chat or task is not None or index is not None
    ids = tok.render_prompt([{"role": "user", "content": text}]) if chat else tok.encode(text, bos=True)
    k = args.best_of or args.n or 1
    params = replace(_sampling_params(args), n=k)
    if not chat:
        params.stop_token_ids = [tok.bos_id]
    hooks = _infer_hooks(args, engine)
    if grammar is not None:
        from .infer.constrained import GrammarHook, grammar_params

        params = grammar_params(params, tok)
        hooks.append(GrammarHook(tok, grammar, engine.config.vocab_size))
    results = {"prompt": args.prompt}
    if reward_dir is not None:
        from .infer.ensemble import reward_model_scorer

        scorer = reward_model_scorer(reward_dir, engine.device)
        samples = engine.generate([ids], params, hooks=hooks)[0]
        scores = [float(s) for s in scorer.batch([(ids, c.tokens) for c in samples])]
        best = max(range(len(samples)), key=lambda j: (scores[j], -j))
        chosen = [samples[best]]
        results.update(best_of=k, scores=scores, chosen=best)
    elif task is not None:
        from .infer.ensemble import majority_vote

        samples = engine.generate([ids], params, hooks=hooks)[0]
        answers = [task.extract(c.text) for c in samples]
        answer, first = majority_vote(answers)
        chosen = [samples[first]] if first >= 0 else []
        results.update(answer=answer, answers=answers)
    elif k == 1 and not args.json and grammar is None:
        if not chat:
            sys.stdout.write(args.prompt)
        for delta in engine.stream(ids, params, hooks=hooks):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    else:
        chosen = engine.generate([ids], params, hooks=hooks)[0]
    if grammar is not None:
        from .infer.constrained import check_complete

        for c in chosen:
            check_complete(c)
    results["completions"] = [{"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.tokens)}
                              for c in chosen]
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return
    if "answer" in results:
        print(f"answer: {results['answer']}   votes: {json.dumps({a: results['answers'].count(a) for a in set(results['answers']) if a is not None})}")
    if "scores" in results:
        print(f"best of {k}: sample {results['chosen']} (reward {results['scores'][results['chosen']]:.3f}; "
              f"all: {', '.join(f'{s:.3f}' for s in results['scores'])})")
    for c in chosen:
        print(c.text)


def cmd_index(args) -> None:
    from .infer.retrieval import build_index, load_documents

    if args.docs.startswith("task:"):
        from .data.tasks import get_task

        task = get_task(args.docs[5:])
        if not hasattr(task, "documents"):
            raise GptstackError(f"task '{task.NAME}' has no document corpus to index")
        docs = task.documents()
    else:
        docs = load_documents(args.docs)
    index = build_index(docs, embedder=args.embedder, max_words=args.max_words, overlap=args.overlap)
    index.save(args.out)
    print(f"indexed {len(docs)} documents as {len(index)} chunks with {args.embedder} -> {args.out}")


def register_infer_commands(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a model in the terminal (streams replies)")
    p.add_argument("run")
    p.add_argument("-p", "--prompt", default=None, help="one-shot: print the reply to this message and exit")
    p.add_argument("--system", default=None, help="system prompt")
    _add_infer_flags(p)
    p.set_defaults(func=cmd_chat, temperature=0.7)

    p = sub.add_parser("generate", help="generate from a prompt: constrained (JSON schema/regex/grammar), "
                                        "voted, best-of-n, retrieval-augmented")
    p.add_argument("run")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="render the prompt as a user turn of a chat")
    p.add_argument("--json-schema", metavar="FILE", default=None)
    p.add_argument("--regex", default=None)
    p.add_argument("--grammar", metavar="FILE", default=None, help="a Lark grammar file")
    p.add_argument("--n", type=int, default=None, help="samples (with --vote: voters)")
    p.add_argument("--vote", metavar="TASK", default=None, help="majority vote of --n samples by TASK's answer")
    p.add_argument("--best-of", type=int, default=None, metavar="K")
    p.add_argument("--reward", metavar="rm:RUN_DIR", default=None, help="reward model for --best-of")
    p.add_argument("--json", action="store_true", help="print a JSON result")
    _add_infer_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("index", help="build a retrieval index from documents (.txt/.md folder, .jsonl, task:facts)")
    p.add_argument("docs")
    p.add_argument("--out", required=True)
    p.add_argument("--embedder", choices=["minilm", "bm25"], default="minilm")
    p.add_argument("--max-words", type=int, default=120)
    p.add_argument("--overlap", type=int, default=20)
    p.set_defaults(func=cmd_index)


# ---- pipeline commands: pipeline, report (pipeline.py, eval/report.py) -------------------------------------


def cmd_report(args) -> None:
    from .eval.report import build_report

    path = build_report(args.run_root)
    print(f"report: {path}  (also report.md, report.json)")


def cmd_pipeline(args) -> None:
    from .pipeline import PipelineConfig, run_pipeline

    cfg = config_from_args(PipelineConfig, args)
    report = run_pipeline(cfg)
    if report.exists():
        print(f"open {report.resolve()}")


def register_pipeline_commands(sub) -> None:
    from .pipeline import PipelineConfig

    p = sub.add_parser("pipeline", help="run every stage (tokenizer -> pretrain -> SFT -> RM -> RL/DPO -> eval -> "
                       "report); finished stages are reused")
    add_config_flags(p, PipelineConfig)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("report", help="rebuild the HTML/Markdown/JSON report of a pipeline run from its directories")
    p.add_argument("run_root", help="the pipeline's output directory (RUN_ROOT)")
    p.set_defaults(func=cmd_report)


# ---- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS, PretrainConfig

    parser = argparse.ArgumentParser(prog="gptstack", description="Make a GPT assistant end to end: tokenizer, "
                                     "pretraining, SFT, reward model, RLHF/DPO, inference, evaluation report.")
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
    p.add_argument("--quantize", choices=["int8", "bnb8", "nf4"], default=None, help="low-precision weights")
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
            from .devices import set_threads

            set_threads(args.threads or 0)
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
