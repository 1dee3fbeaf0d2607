"""Inference commands: sample, bpb, chat, generate, index."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..errors import ConfigError, GptstackError

def _sampling_params(args):
    from ..infer.sampling import SamplingParams

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
    from ..devices import resolve_device
    from ..errors import PromptError
    from ..infer.engine import Engine
    from ..runs import load_model

    if not args.prompt:
        raise PromptError("--prompt is empty: give some text to continue")
    model, tok, _ = load_model(args.run, resolve_device(args.device), quantize=args.quantize)
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
    from ..devices import resolve_device
    from ..eval.bpb import bpb_of_texts, read_texts
    from ..runs import load_model

    texts = read_texts(args.files)
    model, tok, _ = load_model(args.run, resolve_device(args.device))
    result = bpb_of_texts(model, tok, texts)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"bits per byte: {result['val_bpb']:.4f}   ({result['tokens']:,} tokens, {result['bytes']:,} bytes, "
              f"loss {result['val_loss']:.4f} nats/token)")


# ---- inference commands: chat, generate, index (infer/) ----------------------------------------------------


def _load_engine(args):
    """Model (optionally quantized), tokenizer and engine for chat/generate."""
    from ..devices import resolve_device
    from ..infer.engine import Engine
    from ..runs import load_model

    speculate = _speculate_flag(args)   # before loading: a bad flag should not wait for the model
    model, tok, _ = load_model(args.run, resolve_device(args.device), quantize=getattr(args, "quantize", None))
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
    from ..infer.mixing import load_mixing_hook

    return [load_mixing_hook(args.mix_base, args.mix_weight, args.mix_mode, engine)]


def _load_index(args):
    if not getattr(args, "retrieve", None):
        return None
    from ..infer.retrieval import Index

    return Index.load(args.retrieve, embedder=args.embedder)


def _augment(index, text: str, k: int) -> str:
    if index is None:
        return text
    from ..infer.retrieval import augment

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

    from ..errors import PromptError

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

    from ..errors import CheckpointError, ConfigError, PromptError

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
        from ..data.tasks import get_task
        task = get_task(args.vote)
    index = _load_index(args)
    engine, tok = _load_engine(args)
    grammar = None
    if grammar_args:   # compiled (and checked) before anything is generated
        from ..infer.constrained import compile_grammar

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
        from ..infer.constrained import GrammarHook, grammar_params

        params = grammar_params(params, tok)
        hooks.append(GrammarHook(tok, grammar, engine.config.vocab_size))
    results = {"prompt": args.prompt}
    if reward_dir is not None:
        from ..infer.ensemble import reward_model_scorer

        scorer = reward_model_scorer(reward_dir, engine.device)
        samples = engine.generate([ids], params, hooks=hooks)[0]
        scores = [float(s) for s in scorer.batch([(ids, c.tokens) for c in samples])]
        best = max(range(len(samples)), key=lambda j: (scores[j], -j))
        chosen = [samples[best]]
        results.update(best_of=k, scores=scores, chosen=best)
    elif task is not None:
        from ..infer.ensemble import majority_vote

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
        from ..infer.constrained import check_complete

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
    from ..infer.retrieval import build_index, load_documents

    if args.docs.startswith("task:"):
        from ..data.tasks import get_task

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


