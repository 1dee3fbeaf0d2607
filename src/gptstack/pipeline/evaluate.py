"""Evaluate every finished stage of a pipeline run into RUN_ROOT/eval/<stage>.json (the report's input).

Per stage: task accuracy (greedy and sampled pass@1) on every task's test split; self-consistency vote on
the chain-of-thought tasks and best-of-n by the reward model (chat stages); JSON validity of the extraction
task with and without the llguidance schema constraint; facts accuracy with and without retrieval (chat
stages); and model collapse — diversity, entropy and quality
of K samples per prompt, also for the chat model mixed with its base model. A stage whose eval is newer
than its checkpoint is not evaluated again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..runs import is_finished
from .stages import BY_NAME, EVALUATED

VOTE_TASKS = ["arithmetic_cot"]
# The task the pipeline's RL stages train on (the preset's rl_task) is measured on 10x the per-task examples: RL
# moves accuracy by a few points, and at 40 problems the standard error is ~8 points (at 400, ~2.5)
RL_TARGET_SCALE = 10
DIVERSITY_TASKS = ["greetings", "shakespeare"]


def json_validity(model, tokenizer, n: int, seed: int) -> dict:
    """Fraction of extraction replies that parse as JSON and validate against the task's schema,
    greedy, without and with the schema constraint."""
    import jsonschema

    from ..data.tasks import get_task
    from ..infer.constrained import compile_grammar, generate_constrained
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams

    task = get_task("extraction")
    examples = task.generate("test", n, seed)
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.render_prompt(e.prompt_messages()) for e in examples]
    params = SamplingParams(temperature=0.0, max_tokens=48)

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), task.SCHEMA)
            return True
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False

    free = [row[0].text for row in engine.generate(prompts, params)]
    # Bounded strings make the guarantee finite: any output the grammar allows fits in max_tokens, so even a
    # model that would ramble inside a string is forced to close it (valid answers are far shorter anyway).
    schema = json.loads(json.dumps(task.SCHEMA))
    for prop in schema["properties"].values():
        if prop.get("type") == "string":
            prop["maxLength"] = 24
    grammar = compile_grammar(json_schema=schema)
    constrained = [row[0] for row in generate_constrained(engine, prompts, SamplingParams(temperature=0.0, max_tokens=112), grammar)]
    return {"unconstrained": sum(map(valid, free)) / n,
            "constrained": sum(valid(c.text) for c in constrained) / n,
            "constrained_complete": sum(c.finish_reason == "stop" for c in constrained) / n,
            "constrained_accuracy": sum(task.check(e, c.text) for e, c in zip(examples, constrained)) / n,
            "n": n}


def evaluate_stage(stage: str, run: Path, root: Path, n_examples: int, seed: int,
                   rl_task: str = "arithmetic_direct") -> dict:
    from ..runs import load_model
    from ..eval.diversity import measure_stage
    from ..eval.tasks import evaluate_tasks

    model, tok, _ = load_model(run)
    t0 = time.time()
    res = evaluate_tasks(model, tok, "all", n_examples, modes=("greedy", "sample"), seed=seed)
    tasks = {t: dict(v) for t, v in res["tasks"].items()}
    out: dict = {"stage": stage, "tasks": tasks, "n": n_examples}
    if stage != "base":
        _add_ensembles(out, model, tok, root, n_examples, seed)
    out["json_validity"] = json_validity(model, tok, n_examples, seed)
    if stage != "base":
        out["retrieval"] = _retrieval(model, tok, n_examples, seed)
        out["alignment"] = _alignment(model, tok, root, n_examples, seed)
        n_rl = RL_TARGET_SCALE * n_examples
        rl = evaluate_tasks(model, tok, rl_task, n_rl, modes=("greedy", "sample"), seed=seed,
                            temperature=1.0, samples=2)["tasks"][rl_task]
        out["rl_target"] = {"task": rl_task, "n": n_rl, "greedy": rl["greedy"], "sample": rl["sample"],
                            "temperature": 1.0, "samples": 2}
    out["diversity"] = measure_stage(model, tok, DIVERSITY_TASKS, n_prompts=8, k=6, seed=seed, max_tokens=48)
    if stage != "base" and (root / "base" / "model.safetensors").exists():
        hook = _mixing_hook(root / "base", model)
        if hook is not None:
            out["diversity_mixed"] = measure_stage(model, tok, DIVERSITY_TASKS, n_prompts=8, k=6, seed=seed,
                                                   max_tokens=48, hooks=[hook])
    out["samples"] = [{"task": t, "prompt": e["prompt"], "reply": e["completion"], "reward": e["reward"]}
                      for t, exs in res["examples"].items() for e in exs[:1]]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _add_ensembles(out: dict, model, tok, root: Path, n: int, seed: int) -> None:
    """Self-consistency (majority of 5 samples) on the CoT tasks, and best-of-4 by the pipeline's reward
    model when it exists, each against a single sample drawn the same way."""
    from ..data.tasks import get_task
    from ..infer.engine import Engine
    from ..infer.ensemble import best_of_n, reward_model_scorer, self_consistency
    from ..infer.sampling import SamplingParams

    engine = Engine(model, tok)
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=160, seed=seed)
    scorer = reward_model_scorer(str(root / "rm")) if is_finished(root / "rm") else None
    for name in VOTE_TASKS:
        task = get_task(name)
        examples = task.generate("test", n, seed)
        votes = self_consistency(engine, task, examples, 5, params)
        out["tasks"][name]["vote"] = sum(v.score for v in votes) / n
        out["tasks"][name]["vote_single"] = sum(task.check(e, v.samples[0].text) for e, v in zip(examples, votes)) / n
        if scorer is not None:
            prompts = [tok.render_prompt(e.prompt_messages()) for e in examples]
            best = best_of_n(engine, prompts, 4, scorer, params)
            out["tasks"][name]["best_of"] = sum(task.check(e, b.completion.text) for e, b in zip(examples, best)) / n


def _alignment(model, tok, root: Path, n: int, seed: int) -> dict:
    """Mean policy entropy and KL to the SFT model (sequence log-ratio on one T=1 sample per prompt) over a
    few held-out prompts of every task: how far each stage moved from SFT, and how peaked it became."""
    from ..runs import load_model
    from ..train.rl import evaluate_policy, task_examples

    sft = root / "sft"
    ref = load_model(sft)[0] if is_finished(sft) else None
    examples = task_examples("all", "test", max(1, n // 3), seed + 11, per_task=True)
    r = evaluate_policy(model, tok, examples, ref, max_new_tokens=64, seed=seed)
    return {"entropy": r["entropy"], "kl_to_sft": r.get("kl_to_ref"), "n_prompts": len(examples)}


def _retrieval(model, tok, n: int, seed: int) -> dict:
    """Facts-task accuracy with no context, with the BM25 top-1 passage from the facts corpus, and with the
    gold passage: what retrieval buys over the model's memory."""
    from ..data.tasks import get_task
    from ..infer.engine import Engine
    from ..infer.retrieval import retrieval_gain

    return retrieval_gain(Engine(model, tok), get_task("facts").generate("test", n, seed + 7), k=1)


def _mixing_hook(base_run: Path, chat_model):
    from ..infer.mixing import MixingHook
    from ..runs import load_model

    base, _, _ = load_model(base_run)
    return MixingHook(base, weight=0.5, mode="fixed")


def evaluate_pipeline(root: Path, n_examples: int, seed: int = 0, rl_task: str = "arithmetic_direct") -> bool:
    """Evaluate each finished stage whose eval is missing or older than its checkpoint; True if any ran."""
    root = Path(root)
    (root / "eval").mkdir(exist_ok=True)
    ran = False
    from ..io import atomic_write_json

    for stage in EVALUATED:
        run = root / BY_NAME[stage].output
        if not is_finished(run):   # (after finishing, or clearing, a checkpoint killed mid-save)
            continue
        target = root / "eval" / f"{stage}.json"
        if target.exists() and target.stat().st_mtime >= (run / "trainer_state.json").stat().st_mtime:
            continue
        print(f"evaluating {stage} ...", flush=True)
        result = evaluate_stage(stage, run, root, n_examples, seed, rl_task)
        atomic_write_json(target, result)   # temp file, fsync, rename: a kill mid-write leaves no half result
        means = {m: sum(v.get(m, 0) for v in result["tasks"].values()) / len(result["tasks"]) for m in ("greedy", "sample")}
        print(f"  {stage}: mean greedy {means['greedy']:.3f}  sample {means['sample']:.3f}  "
              f"({result['seconds']:.0f}s)", flush=True)
        ran = True
    return ran
