"""Run directories: read and write a whole run (config, tokenizer, model, adapters, reward head, policy).

    RUN/model.safetensors  config.json  tokenizer/  trainer_state.json  optimizer.pt  rng.pt  metrics.jsonl
        [adapter/]  [head.safetensors]  [value_head.safetensors]

This is the layer every stage and command opens runs through: `load_model` (optionally quantized), the
reward model, a frozen teacher or reference, a trainable policy (full weights or fresh LoRA on a frozen
base) and its save/load callbacks, and `run_config` — the one writer of a model run's config.json. Whatever
a run directory holds, a kill mid-save is finished (or cleared) before anything reads it (`recover_run`).
"""

from __future__ import annotations

import os
from pathlib import Path


from .config import LoraOptions, config_to_dict
from .errors import CheckpointError, ConfigError
from .io import (atomic_write_json, check_same_save, commit_checkpoint, load_weights, new_checkpoint_id, read_json, recover_run,
                 save_weights)
from .hub.source import hf_run_config, is_hf_model_dir, resolve_model
from .model.gpt import GPT, GPTConfig, core_gpt, load_state_strict, unwrap
from .tokenizer import Tokenizer


def read_config(run_dir: str | os.PathLike) -> dict:
    """A run's config.json; for a Hugging Face model directory (or hub id) what one would say about it."""
    run = resolve_model(run_dir)
    if is_hf_model_dir(run):
        return hf_run_config(run)
    if not run.is_dir():
        raise CheckpointError(f"'{run}' is not a run directory (it does not exist)")
    recover_run(run)
    path = run / "config.json"
    if not path.exists():
        raise CheckpointError(f"'{run}' is not a gptstack run directory: it has no config.json")
    return read_json(path)


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds a committed checkpoint of a training run that ran to its end (a save killed
    half-way is finished, or cleared, first)."""
    run = Path(run_dir)
    recover_run(run)
    state = run / "trainer_state.json"
    return state.exists() and bool(read_json(state, f"remove '{run}' to retrain it").get("finished"))


def load_tokenizer(run_dir: str | os.PathLike):
    """Our BPE tokenizer, or (an imported model, or a run trained from one) the model's own HF tokenizer."""
    from .hub.tokenizer import HFTokenizer

    run = resolve_model(run_dir)
    if is_hf_model_dir(run):
        return HFTokenizer.from_model_dir(run)
    directory = run / "tokenizer" if (run / "tokenizer").is_dir() else run
    if not (directory / "meta.json").exists():   # a run's tokenizer/, or a bare tokenizer directory
        raise CheckpointError(f"'{run}' has no tokenizer/ directory")
    if read_json(directory / "meta.json").get("kind") == "hf":
        return HFTokenizer.load(directory)
    return Tokenizer.load(directory)


def _base_state(weights_dir: Path, own: bool) -> dict:
    """The full weights a model run (or an HF model directory) holds, under our parameter names."""
    if is_hf_model_dir(weights_dir):
        from .hub.weights import read_hf_state

        return read_hf_state(weights_dir)
    state, meta = load_weights(weights_dir / "model.safetensors")
    if own:
        check_same_save(weights_dir, meta)
    return state


def load_model(run_dir: str | os.PathLike, device="cpu", with_adapter: bool = True,
               quantize: str | None = None) -> tuple[GPT, Tokenizer, dict]:
    """A language model from a run directory, with its tokenizer and config. Adapters (adapter/) are applied
    through PEFT when present; `quantize` (int8, bnb8, nf4) swaps the linear layers for low-precision ones."""
    from .model.quant import MODES

    if quantize is not None and quantize not in MODES:   # before loading: a bad flag should not wait
        raise ConfigError(f"unknown --quantize {quantize!r}; choose one of {', '.join(MODES)}")
    run = resolve_model(run_dir)
    config = read_config(run)
    if "model" not in config:
        raise CheckpointError(f"'{run}/config.json' has no model section: not a gptstack model run")
    tokenizer = load_tokenizer(run)
    mcfg = GPTConfig.from_dict(config["model"])
    if getattr(tokenizer, "kind", None) == "hf":
        tokenizer.pad_to(mcfg.vocab_size)   # an HF embedding may have more rows than the tokenizer has tokens
    elif tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"tokenizer in '{run}' has {tokenizer.vocab_size} tokens but the model expects "
                              f"{mcfg.vocab_size}: they do not belong together")
    has_adapter = (run / "adapter").is_dir() and not (run / "model.safetensors").exists()
    weights_dir = run
    if has_adapter:
        # a LoRA run stores only the adapter; the base weights live in the parent run
        parent = config.get("parent_run")
        if not parent:
            raise CheckpointError(f"'{run}' holds only an adapter and names no parent run")
        weights_dir = resolve_model(parent)
    state = _base_state(weights_dir, own=weights_dir == run)
    model = GPT(mcfg)
    load_state_strict(model, state, f"'{weights_dir}'")
    model.to(device)
    if has_adapter and with_adapter:
        from .model.adapters import load_adapter

        model = load_adapter(model, run / "adapter", run_config=config)
    model.eval()
    if quantize:
        from .model.quant import quantize as quantize_model

        quantize_model(model, quantize)
    return model, tokenizer, config


def load_frozen(run_dir: str | os.PathLike, device="cpu", role: str = "teacher"):
    """A model that is read but never trained (a teacher, a reference, a base to mix in): eval mode, no
    gradients. Returns (model, tokenizer, config)."""
    if not resolve_model(run_dir).is_dir():
        raise CheckpointError(f"{role} run '{run_dir}' does not exist")
    model, tok, config = load_model(run_dir, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok, config


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a normal run directory (model.safetensors, config.json, tokenizer/) with the adapter of
    `run_dir` merged in. Refuses to overwrite an existing run."""
    from .model.adapters import merge_adapter

    run, out = Path(run_dir), Path(out_dir)
    recover_run(out)   # a merge killed mid-save is finished first, so the check below sees what is there
    config = read_config(run)
    if not (run / "adapter").is_dir():
        raise CheckpointError(f"'{run}' has no adapter/ directory: there is nothing to merge (it is already a "
                              "full model)")
    if (run / "model.safetensors").exists():
        raise CheckpointError(f"'{run}' holds both full weights and an adapter; merge expects an adapter run")
    if out.resolve() == run.resolve():
        raise ConfigError("--out must differ from the run being merged")
    if (out / "model.safetensors").exists() or (out / "trainer_state.json").exists():
        raise ConfigError(f"'{out}' already holds a run; choose another --out (nothing was overwritten)")
    model, tokenizer, config = load_model(run, "cpu")
    merged = merge_adapter(model)
    new_config = dict(config)
    new_config["merged_from"] = str(run.resolve())
    new_config["adapter"] = None
    with commit_checkpoint(out) as tmp:   # weights, tokenizer and config land together or not at all
        save_weights(tmp / "model.safetensors", merged.state_dict(), {"checkpoint_id": new_checkpoint_id()})
        tokenizer.save(tmp / "tokenizer")
        atomic_write_json(tmp / "config.json", new_config)
    return out


# ---- a policy being trained (SFT's LoRA, RL, DPO, reward body, distillation student) -----------------------

def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def base_weights_run(run) -> str:
    """The run holding full weights that a LoRA-only child of `run` is applied to."""
    run = resolve_model(run)
    if (run / "model.safetensors").exists() or is_hf_model_dir(run):
        return str(run)
    parent = read_config(run).get("parent_run")
    if not parent:
        raise CheckpointError(f"'{run}' holds no model.safetensors and names no parent run")
    return str(parent)


def load_trainable_policy(run, device, lora: LoraOptions | None = None):
    """The LM of `run`, ready to train: every weight trainable, or (`lora.lora`) fresh LoRA adapters on a
    frozen base. An adapter run is merged first (its LoRA update folded in)."""
    from .model.adapters import apply_lora, merge_adapter, parse_targets

    if not resolve_model(run).is_dir():
        raise CheckpointError(f"run directory '{run}' does not exist")
    model, tok, config = load_model(run, device)
    if is_peft(model):
        if lora is not None and lora.lora:
            raise ConfigError(f"'{run}' is itself a LoRA run: merge it first (gptstack merge) to put new "
                              "adapters on top, or train without --lora")
        model = merge_adapter(model)
    if lora is not None and lora.lora:
        model = apply_lora(model, rank=lora.lora_rank, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                           targets=parse_targets(lora.lora_targets))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.to(device), tok, config


def save_policy(model, run_dir: Path, cid: str) -> None:
    """adapter/ for a LoRA policy (applied to parent_run's weights), else model.safetensors. As a stage's save
    callback `run_dir` is the staging directory of the loop's checkpoint commit."""
    from .model.adapters import save_adapter

    model = unwrap(model)
    if is_peft(model):
        save_adapter(model, Path(run_dir) / "adapter", cid)
    else:
        save_weights(Path(run_dir) / "model.safetensors", core_gpt(model).state_dict(), {"checkpoint_id": cid})


def load_policy_state(model, run_dir: Path) -> None:
    """The inverse of `save_policy`, for resuming: the saved weights must come from the same save as the
    run's trainer_state.json."""
    from .model.adapters import read_adapter, set_adapter_state

    model, run_dir = unwrap(model), Path(run_dir)
    if is_peft(model):
        state, meta = read_adapter(run_dir / "adapter")
        check_same_save(run_dir, meta, "an adapter")
        set_adapter_state(model, state, f"'{run_dir}/adapter'")
        return
    state, meta = load_weights(run_dir / "model.safetensors")
    check_same_save(run_dir, meta)
    load_state_strict(core_gpt(model), state, f"the checkpoint in '{run_dir}'")


def run_config(stage: str, policy, tok, cfg, source_run, kind: str = "lm", **extra) -> dict:
    """config.json of a trained run, the one schema every stage writes: what it is (`kind`, `stage`), the
    model, the stage config, where its weights live (`parent_run`: itself, or the base a LoRA adapter goes
    on), what it started from (`source_run`) and the tokenizer it must be read with."""
    lora = is_peft(policy)
    adapter = None
    if lora:
        lcfg = policy.peft_config["default"]
        adapter = {"rank": int(lcfg.r), "alpha": float(lcfg.lora_alpha),
                   "targets": sorted(lcfg.target_modules) if not isinstance(lcfg.target_modules, str)
                   else [lcfg.target_modules], "qlora": bool(getattr(cfg, "qlora", False))}
        adapter.update(extra.pop("adapter", None) or {})
    source = str(source_run) if source_run is not None else None
    return {"kind": kind, "stage": stage, "model": core_gpt(policy).config.to_dict(), "train": config_to_dict(cfg),
            "parent_run": (base_weights_run(source_run) if lora else source),
            "source_run": source, "adapter": adapter, "tokenizer_fingerprint": tok.fingerprint(), **extra}


# ---- reward models --------------------------------------------------------------------------------------

def save_reward(model, run_dir: Path, cid: str) -> None:
    from .model.heads import save_head

    save_policy(model.body, run_dir, cid)
    save_head(model.head, run_dir / "head.safetensors", cid)


def load_reward_state(model, run_dir: Path) -> None:
    from .model.heads import load_head

    load_policy_state(model.body, run_dir)
    load_head(model.head, run_dir / "head.safetensors")


def load_reward_model(run_dir, device="cpu"):
    """(reward model, tokenizer, config) from a `gptstack reward` run directory, frozen."""
    from .model.heads import RewardModel, ScalarHead, load_head

    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"reward model run '{run}' does not exist: train one with `gptstack reward`")
    config = read_config(run)
    if config.get("kind") != "reward" or not (run / "head.safetensors").exists():
        raise CheckpointError(f"'{run}' is not a reward-model run (config.json kind is {config.get('kind')!r}, "
                              "and a head.safetensors is needed): train one with `gptstack reward`")
    body, tok, config = load_model(run, device)
    rm = RewardModel(body, ScalarHead(core_gpt(body).config.n_embd)).to(device)
    load_head(rm.head, run / "head.safetensors")
    rm.eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm, tok, config


# ---- importing a Hugging Face model as a run ----------------------------------------------------------------

def import_model(source, out_dir) -> Path:
    """Write the HF model `source` (a directory or hub id) as a normal run directory: model.safetensors under
    our names (in the checkpoint's own dtype), config.json, tokenizer/ (the model's own, with its template)
    and a finished trainer_state.json, so the pipeline and every command treat it as a trained base."""
    from .hub.weights import read_hf_state

    src, out = resolve_model(source), Path(out_dir)
    if not is_hf_model_dir(src):
        raise CheckpointError(f"'{source}' is not a Hugging Face model directory (no transformers config.json)")
    recover_run(out)
    if (out / "model.safetensors").exists() or (out / "trainer_state.json").exists():
        raise ConfigError(f"'{out}' already holds a run; choose another --out (nothing was overwritten)")
    config = read_config(src)
    mcfg = GPTConfig.from_dict(config["model"])
    tokenizer = load_tokenizer(src)
    tokenizer.pad_to(mcfg.vocab_size)
    state = read_hf_state(src, dtype=None)
    load_state_strict(GPT(mcfg), {k: v.float() for k, v in state.items()}, f"'{src}'")   # fits, before writing
    if mcfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    config = {**config, "source_run": str(source), "parent_run": None,
              "tokenizer_fingerprint": tokenizer.fingerprint()}
    cid = new_checkpoint_id()
    with commit_checkpoint(out) as tmp:
        save_weights(tmp / "model.safetensors", state, {"checkpoint_id": cid})
        tokenizer.save(tmp / "tokenizer")
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "trainer_state.json", {"finished": True, "step": 0, "checkpoint_id": cid,
                                                       "imported_from": str(source)})
    return out
