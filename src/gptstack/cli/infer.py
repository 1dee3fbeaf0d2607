"""Inference commands: sample, bpb, chat, generate, index: parse the flags, call the library, print.

chat talks through `infer.chat.ChatSession` (the conversation, its commands and context handling live there);
generate's --vote and --best-of are `infer.ensemble.vote` and `best_of_n`. Names are shared with the rest of
the CLI: --max-new-tokens (alias --max-tokens) for the reply's length, --samples (alias --n) for samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ConfigError, GptstackError

# the libraries' own lists (model/quant.MODES, infer/retrieval.EMBEDDERS, infer/mixing.MODES) import torch,
# which --help must not
QUANTIZE = ("int8", "bnb8", "nf4")
EMBEDDERS = ("minilm", "bm25")
MIX_MODES = ("fixed", "entropy")


def _sampling_params(args):
    """SamplingParams from the sampling flags (its max_tokens / n mirror the OpenAI API's names)."""
    from ..infer.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          max_tokens=args.max_new_tokens, seed=args.seed, stop=list(args.stop or []),
                          repetition_penalty=args.repetition_penalty, n=getattr(args, "samples", 1) or 1)


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help="sampling temperature: 0 is greedy (deterministic), higher is more varied "
                        "(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="sample only among the K most likely tokens; 0: no limit (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: only the most likely tokens whose probabilities add up to P, in (0, 1]; "
                        "1: off (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the most likely one, in [0, 1); 0: off "
                        "(default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="make tokens already generated less likely (CTRL-style; above 1 discourages repeats; "
                        "1: off) (default: %(default)s)")
    g.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=200, metavar="N",
                   help="stop after N new tokens (the reply's length limit) (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed: the same seed and flags give the same text (default: a fresh sample each run)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output contains TEXT, which is left out (repeatable)")


def _add_device_flag(g) -> None:
    g.add_argument("--device", default="auto",
                   help="where to run: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps (default: %(default)s)")


def _add_quantize_flag(g) -> None:
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="low-precision weights: int8 (weight-only int8, per-channel scales), bnb8 (bitsandbytes "
                        "LLM.int8), nf4 (bitsandbytes 4-bit NormalFloat) (default: full precision)")


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
               "--samples > 1" if (getattr(args, "samples", 1) or 1) > 1 else
               "--best-of" if getattr(args, "best_of", 0) else
               "a grammar (--json-schema/--regex/--grammar)" if any(getattr(args, k, None) for k in
                                                                    ("json_schema", "regex", "grammar")) else
               "--mix-base" if getattr(args, "mix_base", None) else "")
        if why:
            raise ConfigError(f"--speculate verifies drafts against greedy decoding of one sequence "
                              f"(generate, --temperature 0, --samples 1, no grammar or mixing); not with {why}")
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


def _add_infer_flags(p, temperature: float = 0.8) -> None:
    add_sampling_flags(p, temperature)
    g = p.add_argument_group("inference")
    _add_device_flag(g)
    _add_quantize_flag(g)
    g.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="generate with --temperature 0 and one sample: verify up to K prompt-lookup draft tokens "
                        "per pass (same output as plain greedy; pays off on text that repeats or copies its prompt; "
                        "default: 0, off)")
    g.add_argument("--retrieve", metavar="INDEX", default=None,
                   help="retrieve passages from this index (built by `gptstack index`) into the prompt")
    g.add_argument("--top-k-passages", "--passages", dest="passages", type=int, default=3, metavar="K",
                   help="passages to retrieve (with --retrieve) (default: %(default)s)")
    g.add_argument("--embedder", choices=EMBEDDERS, default=None,
                   help="embedder the index must have been built with: an error if it was not "
                        "(default: whichever it was)")
    g.add_argument("--mix-base", metavar="RUN_DIR", default=None,
                   help="mix in this base model's next-token distribution (the chat model's own base run)")
    g.add_argument("--mix-weight", type=float, default=0.3, metavar="W",
                   help="weight of the base model's distribution, in [0, 1] (with --mix-base) (default: %(default)s)")
    g.add_argument("--mix-mode", choices=MIX_MODES, default="fixed",
                   help="fixed: always mix with weight W; entropy: up to W, only where the chat model is more "
                        "confident than the base (with --mix-base) (default: %(default)s)")


def _tool_choice(value: str):
    """--tool-choice: auto, none, required, or a tool's name (that tool must be called)."""
    if value in ("auto", "none", "required"):
        return value
    return {"type": "function", "function": {"name": value}}


def _load_tools(args):
    """--tools SPEC -> (tools, tool_choice), checked before the model loads; ([], None) without --tools."""
    if not getattr(args, "tools", None):
        if getattr(args, "tool_choice", "auto") != "auto":
            raise ConfigError("--tool-choice needs --tools")
        return [], None
    clash = [flag for flag, on in (("--speculate", getattr(args, "speculate", 0)),
                                   ("--mix-base", getattr(args, "mix_base", None)),
                                   ("--json-schema/--regex/--grammar", any(getattr(args, k, None) for k in
                                                                           ("json_schema", "regex", "grammar"))),
                                   ("--vote", getattr(args, "vote", None)),
                                   ("--best-of", getattr(args, "best_of", None)),
                                   ("--samples", (getattr(args, "samples", None) or 1) > 1)) if on]
    if clash:
        raise ConfigError(f"--tools runs the agent loop on one sample; it does not combine with {', '.join(clash)}")
    if args.max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {args.max_steps}")
    from ..infer.agent import tools_from_spec
    from ..infer.constrained import tool_choice_of

    tools = tools_from_spec(args.tools)
    choice = _tool_choice(args.tool_choice)
    tool_choice_of(choice, [t.schema for t in tools])
    return tools, choice


def _show_tool_message(m: dict, out=None) -> None:
    """A call or a result as the user sees it: [calculator({"expression": "2*3"})] and [-> 6]."""
    out = out or sys.stdout
    if m["role"] == "tool":
        out.write(f"[-> {m['content']}]\n")
        out.flush()
        return
    if m.get("content"):
        out.write(m["content"] + "\n")
    for call in m.get("tool_calls") or ():
        out.write(f"[{call['function']['name'] or '?'}({call['function']['arguments']})]\n")
    out.flush()


def _add_tool_flags(p) -> None:
    g = p.add_argument_group("tools (the agent loop)")
    g.add_argument("--tools", metavar="SPEC", default=None,
                   help="let the model call tools: a comma-separated list of calculator and search:INDEX_DIR "
                        "(an index built by `gptstack index`); calls and results are shown as they happen")
    g.add_argument("--tool-choice", default="auto", metavar="CHOICE",
                   help="auto (the model decides), none (no calls), required (the first turn must call), or a "
                        "tool name (the first turn calls that tool) (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=4, metavar="N",
                   help="model turns per message with --tools: calls, results and the answer (default: %(default)s)")


def cmd_chat(args) -> None:
    from ..infer.chat import COMMANDS, ChatSession

    tools, tool_choice = _load_tools(args)
    engine, _ = _load_engine(args)
    one_shot = args.prompt is not None
    interactive = not one_shot and sys.stdin.isatty()

    def notice(msg: str) -> None:
        print(f"[{msg}]", file=sys.stderr if one_shot else sys.stdout, flush=True)

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    chat = ChatSession(engine, _sampling_params(args), system=args.system or "", hooks=_infer_hooks(args, engine),
                       index=_load_index(args), passages=args.passages, on_notice=notice, tools=tools,
                       tool_choice=tool_choice or "auto", max_steps=args.max_steps, on_tool=_show_tool_message)
    if one_shot:
        chat.turn(args.prompt, on_delta=write)
        write("\n")
        return
    if interactive:
        print(f"gptstack chat — {COMMANDS}", flush=True)
    while True:
        if interactive:
            write("you> ")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if chat.is_command(line):
            result = chat.command(line)
            if result.quit:
                break
            notice(result.message)
            continue
        try:
            chat.turn(line, on_delta=write)
        except GptstackError as e:
            notice(f"error: {e}")
        else:
            write("\n")


def cmd_generate(args) -> None:
    from dataclasses import replace

    from ..errors import CheckpointError, ConfigError, PromptError

    if args.prompt is None or not args.prompt.strip():
        raise PromptError("--prompt is empty: give some text")
    grammar_args = [a for a in ("json_schema", "regex", "grammar") if getattr(args, a)]
    if len(grammar_args) > 1:
        raise ConfigError("give at most one of --json-schema, --regex, --grammar")
    for flag, k in (("--samples", args.samples), ("--best-of", args.best_of)):
        if k is not None and k < 1:
            raise ConfigError(f"{flag} must be at least 1, got {k}")
    if args.vote and not args.samples:
        raise ConfigError("--vote TASK needs --samples K (the samples to vote over)")
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
    tools, tool_choice = _load_tools(args)
    index = _load_index(args)
    engine, tok = _load_engine(args)
    if tools:
        return _generate_with_tools(args, engine, tools, tool_choice, _augment(index, args.prompt, args.passages))
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
    k = args.best_of or args.samples or 1
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
        from ..infer.ensemble import best_of_n, reward_model_scorer

        best = best_of_n(engine, [ids], k, reward_model_scorer(reward_dir, engine.device), params, hooks=hooks)[0]
        chosen = [best.completion]
        results.update(best_of=k, scores=best.scores, chosen=best.index)
    elif task is not None:
        from ..infer.ensemble import vote

        v = vote(task, engine.generate([ids], params, hooks=hooks)[0])
        chosen = [v.completion] if v.completion is not None else []
        results.update(answer=v.answer, answers=v.answers)
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
    if task is not None:
        print(f"answer: {v.answer}   votes: {json.dumps(v.votes)}")
    if reward_dir is not None:
        print(f"best of {k}: sample {best.index} (reward {best.score:.3f}; "
              f"all: {', '.join(f'{s:.3f}' for s in best.scores)})")
    for c in chosen:
        print(c.text)


def _generate_with_tools(args, engine, tools, tool_choice, text: str) -> None:
    """generate --tools: the agent loop on one user message; shows calls and results, then the answer (or,
    with --json, one object with every message the loop added)."""
    from ..infer.agent import run_agent

    messages = [{"role": "user", "content": text}]
    show = None if args.json else _show_tool_message
    result = run_agent(engine, messages, tools, _sampling_params(args), max_steps=args.max_steps,
                       tool_choice=tool_choice, on_message=show)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "messages": result.messages[1:], "steps": result.steps,
                          "stop_reason": result.stop_reason}, ensure_ascii=False))
    elif result.stop_reason != "answer":
        print(f"[stopped after {result.steps} step(s): {result.stop_reason}]", file=sys.stderr)


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
    p.add_argument("run", help="run directory of the model")
    p.add_argument("--prompt", required=True, help="text to continue (printed, then its continuation)")
    add_sampling_flags(p)
    g = p.add_argument_group("model")
    _add_device_flag(g)
    _add_quantize_flag(g)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bpb", help="bits per byte of text files under a model")
    p.add_argument("run", help="run directory of the model")
    p.add_argument("files", nargs="+", help="text files to score")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device_flag(p)
    p.set_defaults(func=cmd_bpb)

    p = sub.add_parser("chat", help="multi-turn chat with a model in the terminal (streams replies)")
    p.add_argument("run", help="run directory of the chat model (an SFT, RL or DPO run)")
    p.add_argument("-p", "--prompt", default=None,
                   help="one-shot: print the reply to this message and exit (notices go to stderr)")
    p.add_argument("--system", default=None, help="system prompt (change it in the chat with /system TEXT)")
    _add_infer_flags(p, temperature=0.7)
    _add_tool_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate from a prompt: constrained (JSON schema/regex/grammar), "
                                        "voted, best-of-n, retrieval-augmented")
    p.add_argument("run", help="run directory of the model")
    p.add_argument("--prompt", required=True, help="the prompt: text to continue, or with --chat a user message")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as a user turn of a chat (implied by --vote and --retrieve)")
    g = p.add_argument_group("constraints (at most one)")
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="the output is JSON valid under the JSON schema in FILE")
    g.add_argument("--regex", default=None, metavar="REGEX", help="the output matches this regular expression")
    g.add_argument("--grammar", metavar="FILE", default=None, help="the output parses under the Lark grammar in FILE")
    g = p.add_argument_group("samples")
    g.add_argument("--samples", "--n", dest="samples", type=int, default=None, metavar="K",
                   help="samples to draw from the prompt, all printed (with --vote: the voters) (default: 1)")
    g.add_argument("--vote", metavar="TASK", default=None,
                   help="majority vote of the --samples samples by the final answer TASK extracts from each "
                        "(a task name, see `gptstack tasks list`); prints the winning sample")
    g.add_argument("--best-of", type=int, default=None, metavar="K",
                   help="draw K samples and print the one the --reward model scores highest")
    g.add_argument("--reward", metavar="rm:RUN_DIR", default=None,
                   help="reward model for --best-of (a run trained by `gptstack reward`)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: the completions, and the votes or scores (with --tools: the "
                        "messages the agent loop added)")
    _add_infer_flags(p)
    _add_tool_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("index", help="build a retrieval index from documents (.txt/.md folder, .jsonl, task:facts)")
    p.add_argument("docs", help="a folder of .txt/.md files, a .txt/.md file, a .jsonl file with a text field, or "
                                "task:NAME for a task's document corpus (task:facts)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the index to")
    p.add_argument("--embedder", choices=EMBEDDERS, default="minilm",
                   help="minilm: MiniLM sentence embeddings (dense; needs the model); bm25: word-overlap scoring "
                        "(no model) (default: %(default)s)")
    p.add_argument("--max-words", type=int, default=120, metavar="N",
                   help="words per chunk: documents are split into chunks of at most N words (default: %(default)s)")
    p.add_argument("--overlap", type=int, default=20, metavar="N",
                   help="words each chunk repeats from the end of the previous one (default: %(default)s)")
    p.set_defaults(func=cmd_index)
