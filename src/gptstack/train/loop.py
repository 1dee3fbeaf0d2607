"""THE training loop. Pretraining, SFT, reward modeling, DPO, distillation and the RL update all run here.

A stage hands over a `Stage`: the module to train, a resumable batch iterator, a loss function and a few
hooks. The loop owns everything else: devices and precision, DDP or FSDP2 under torchrun (`--parallel`;
parallel.py holds the sharding and the sharded checkpoints), activation checkpointing, gradient
accumulation, clipping, the LR schedule, logging (progress bar, metrics.jsonl, optional wandb/tensorboard),
periodic evaluation and samples, atomic checkpoints, and exact resume.

Ranks: data is sharded by global rank (each stage's iterator takes its rank's rows), rank 0 is the one writer
of a run (config, metrics, the commit), every rank writes only its own DCP shards into rank 0's staging
directory, and barriers stand wherever a rank reads what another has written. LOCAL_RANK only picks the GPU.

    stage = Stage(name="sft", model=model, batches=batches, loss_fn=loss, save=save, ...)
    result = train(stage, cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import TrainConfig, check_batch_divides, config_to_dict
from ..devices import autocast, busy_cores, fit_threads_to_free_cores, machine_info, matmul_dtype, resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError
from ..io import (atomic_write_bytes, atomic_write_json, commit_checkpoint, has_checkpoint, new_checkpoint_id,
                  read_json, recover_run)
from ..model.gpt import unwrap
from ..runs import load_policy_state, save_policy
from . import parallel
from .optim import build_optimizers, lr_multiplier, set_lr

LossFn = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]

# Peak dense bf16 FLOP/s, for MFU on GPUs we recognise.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


@dataclass
class Stage:
    name: str
    model: torch.nn.Module
    batches: Iterator[dict]                    # must offer state_dict() / load_state_dict() for resume
    loss_fn: LossFn                            # (model, batch) -> (loss, metrics)
    run_config: dict                           # written to config.json (model + stage config + parent run)
    tokenizer: Any
    save: Callable[[torch.nn.Module, Path, str], None] = save_policy    # writes under the staging dir
    load: Callable[[torch.nn.Module, Path], None] = load_policy_state
    evaluate: Callable[[torch.nn.Module], dict] | None = None     # -> {"val_loss": ..., "val_bpb": ...}
    evaluate_at_start: bool = False            # also evaluate before step 1 (a fresh run): the baseline in the log
    sample: Callable[[torch.nn.Module], str] | None = None        # -> text shown in the log
    tokens_in: Callable[[dict], int] = lambda b: int(b["input_ids"].numel())
    flops_per_token: float = 0.0
    corpus_tokens: int = 0                     # unique training tokens available (for epochs)
    n_params: int = 0
    after_step: Callable[[int, dict], None] | None = None         # e.g. adaptive KL control in RL
    extra_state: Callable[[], dict] | None = None                 # stage state to checkpoint (RL KL coef...)
    load_extra_state: Callable[[dict], None] | None = None
    frozen: list = field(default_factory=list)  # models read but never trained (reference, teacher): sharded too under FSDP


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    last: dict = field(default_factory=dict)   # the final logged metrics (and final eval)
    interrupted: bool = False


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def distributed_context():
    """(rank, world, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def run_dir_in_use(out: Path) -> bool:
    return (out / "trainer_state.json").exists() or (out / "model.safetensors").exists()


def _refuse_non_training_run(out: Path) -> None:
    """--resume restarts a run that never committed a checkpoint, but must not overwrite weights that are
    not a training run's leftovers (a merged model, an export)."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    if (out / "model.safetensors").exists() and config.get("merged_from"):
        raise ConfigError(f"'{out}' holds a merged model, not a training run to resume: choose another --out "
                          "(nothing was overwritten)")


class MetricsLog:
    """metrics.jsonl (one object per logged step) plus optional wandb / tensorboard mirrors."""

    def __init__(self, out: Path, cfg: TrainConfig, resume_step: int, is_main: bool, run_name: str):
        self.path, self.is_main = out / "metrics.jsonl", is_main
        self.wandb = self.tb = None
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():  # drop lines past the checkpoint so the log matches the state
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        if cfg.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb, name=run_name, config=config_to_dict(cfg))
            except ImportError:
                print("note: --wandb asked for but wandb is not installed; logging to metrics.jsonl only")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("note: --tensorboard asked for but tensorboard is not installed")

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_checkpoint(stage: Stage, model, optimizers, out: Path, state: dict, is_main: bool,
                    fsdp: bool = False) -> None:
    """One checkpoint: the stage's weights (stage.save), tokenizer/, config.json, optimizer.pt, rng.pt and
    trainer_state.json, staged and committed as a whole (io.commit_checkpoint), so a kill at any moment
    leaves the previous checkpoint or this one. Every rank calls it.

    Under FSDP (`fsdp`) optimizer.pt is replaced by dcp/: rank 0 opens the commit and names its staging
    directory, every rank writes its shards of the model and optimizer state into it, and after a barrier
    rank 0 writes the rest (the consolidated weights through stage.save) and commits. trainer_state.json
    says which of the two the checkpoint holds (`checkpoint_format`)."""
    world = _world()
    if world > 1:   # per-rank iterators (SFT's) have per-rank positions: keep each one's
        data = [None] * world
        torch.distributed.all_gather_object(data, state.get("data"))
        if any(d != data[0] for d in data):
            state = dict(state, data_by_rank=data)
    cid = new_checkpoint_id() if is_main else None
    full = None
    if fsdp:
        cid = parallel.broadcast_object(cid)
        full = parallel.full_model_state(model)   # collective; the tensors land on rank 0's CPU
    elif not is_main:
        return
    with commit_checkpoint(out) if is_main else contextlib.nullcontext() as tmp:
        if fsdp:
            tmp = Path(parallel.broadcast_object(str(tmp) if is_main else None))
            parallel.save_dcp(model, optimizers, tmp / parallel.DCP_DIR, cid)
            torch.distributed.barrier()   # every rank's shards are in the staging directory before the commit
        if is_main:
            if fsdp:
                with parallel.state_dict_view(model, full):
                    stage.save(model, tmp, cid)
            else:
                stage.save(model, tmp, cid)
                atomic_write_bytes(tmp / "optimizer.pt", _torch_bytes(
                    {"checkpoint_id": cid, "optimizers": [o.state_dict() for o in optimizers]}))
            stage.tokenizer.save(tmp / "tokenizer")
            atomic_write_json(tmp / "config.json", stage.run_config)
            state = dict(state, checkpoint_id=cid, checkpoint_format="dcp" if fsdp else "torch", world=world)
            atomic_write_bytes(tmp / "rng.pt", _torch_bytes(_rng_state()))   # RNG states are tensors: beside the JSON
            if stage.extra_state:
                state["stage_state"] = stage.extra_state()
            atomic_write_json(tmp / "trainer_state.json", state)
    if is_main:   # the other format's files of an earlier save no longer belong to the committed checkpoint
        stale = out / ("optimizer.pt" if fsdp else parallel.DCP_DIR)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists():
            stale.unlink()


def _torch_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _read_resume_state(stage: Stage, out: Path) -> dict:
    recover_run(out)   # a save killed half-way is finished first
    try:
        state = json.loads((out / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot resume: '{out}/trainer_state.json' is missing or corrupt ({type(e).__name__})") from None
    if state.get("checkpoint_format") == "dcp":
        # DCP would load a different model's shards as far as their names match: compare the model first
        saved = read_json(out / "config.json").get("model")
        now = stage.run_config.get("model")
        if saved is not None and now is not None and saved != now:
            diff = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
                             if saved.get(k) != now.get(k))
            raise ConfigError(f"cannot resume '{out}': its checkpoint holds a different model ({diff}); resume with "
                              "the settings it was trained with, or choose another --out")
    return state


def _load_resume(stage: Stage, model, optimizers, out: Path, state: dict, weights_loaded: bool = False) -> dict:
    """Weights, optimizer, data position, RNG and stage state from the committed checkpoint in `out`. A DCP
    checkpoint (saved under FSDP) loads into a sharded or a plain model at any world size; optimizer.pt into
    a plain one, or into a sharded one whose weights were loaded before sharding (`weights_loaded`)."""
    if state.get("checkpoint_format") == "dcp":
        parallel.load_dcp(model, optimizers, out / parallel.DCP_DIR, state.get("checkpoint_id"))
    else:
        if not weights_loaded:
            stage.load(model, out)
        try:
            opt = torch.load(out / "optimizer.pt", map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"cannot resume: '{out}/optimizer.pt' is corrupt ({type(e).__name__})") from None
        if opt.get("checkpoint_id") != state.get("checkpoint_id"):
            raise CheckpointError(f"cannot resume: '{out}' holds optimizer and trainer state from different saves")
        saved = opt["optimizers"]
        if parallel.is_fsdp(model):
            saved = parallel.shard_optimizer_state(optimizers, saved)
        for o, s in zip(optimizers, saved):
            o.load_state_dict(s)
    data = state.get("data")
    by_rank, world = state.get("data_by_rank"), _world()
    if by_rank is not None:
        if len(by_rank) == world:
            data = by_rank[torch.distributed.get_rank()]
        elif is_main_process():
            print(f"note: the data position was saved by {len(by_rank)} ranks and this run has {world}: the data "
                  "order from here differs from an uninterrupted run", flush=True)
    if hasattr(stage.batches, "load_state_dict") and data is not None:
        stage.batches.load_state_dict(data)
    if (out / "rng.pt").exists():
        _set_rng_state(torch.load(out / "rng.pt", weights_only=False))
    if stage.load_extra_state and state.get("stage_state") is not None:
        stage.load_extra_state(state["stage_state"])
    return state


def _mfu(device: torch.device, flops_per_token: float, tok_per_s: float, world: int) -> float | None:
    if device.type != "cuda" or not flops_per_token:
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else flops_per_token * tok_per_s / (peak * world)


def train(stage: Stage, cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    out = Path(cfg.out)
    rank, world, _ = distributed_context()
    is_main = rank == 0
    parallel.check_parallel(cfg, stage.name, world, stage.run_config)
    fsdp = cfg.parallel == "fsdp"
    micro_tokens = cfg.batch_size * cfg.seq_len * world
    check_batch_divides(cfg.total_batch_tokens, cfg.batch_size, cfg.seq_len, world)   # (validate's, once more)
    accum = max(1, cfg.total_batch_tokens // micro_tokens) if cfg.total_batch_tokens else 1
    committed = has_checkpoint(out)   # after finishing (or clearing) a save a kill interrupted
    if world > 1:
        torch.distributed.barrier()   # no rank reads the run before every rank has seen it recovered
    if run_dir_in_use(out) and not cfg.resume:
        state_path = out / "trainer_state.json"
        finished = state_path.exists() and json.loads(state_path.read_text()).get("finished")
        raise ConfigError(f"'{out}' already holds a {'finished ' if finished else ''}run: pass --resume to "
                          "continue it, or choose another --out (nothing was overwritten)")
    if cfg.resume and not committed:
        # killed before its first checkpoint (or an older version killed during it): nothing to continue
        _refuse_non_training_run(out)
        if is_main:
            print(f"note: '{out}' holds no committed checkpoint (the run stopped before its first save): "
                  "starting it from step 0", flush=True)
        cfg = dataclasses.replace(cfg, resume=False)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_dtype(cfg.dtype, device, training=True)
    # what a figure from this run needs to be reproduced: the machine, its threads and the chosen precision
    if device.type == "cpu":
        busy = busy_cores()
        _, notice = fit_threads_to_free_cores(busy)
        if notice and is_main:
            print(notice, flush=True)
    machine = machine_info(device, amp_dtype, matmul_dtype(device) if cfg.optimizer == "muon" else None)
    if device.type == "cpu":
        machine["busy_cores_at_start"] = round(busy, 2)
    stage.run_config["machine"] = machine
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    model = stage.model.to(device)
    n_embd = getattr(getattr(unwrap(model), "config", None), "n_embd", 0) or _guess_width(model)
    resume_state = _read_resume_state(stage, out) if cfg.resume else None
    if resume_state is not None and resume_state.get("finished"):
        if is_main:
            print(f"'{out}' already finished at step {resume_state['step']}; nothing to do")
        return TrainResult(resume_state["step"], resume_state["tokens"], resume_state.get("elapsed", 0.0),
                           resume_state.get("last", {}))
    if cfg.activation_checkpointing:
        parallel.checkpoint_blocks(model)
    weights_loaded = False
    if fsdp:
        if resume_state is not None and resume_state.get("checkpoint_format") != "dcp":
            stage.load(model, out)   # an unsharded checkpoint: whole weights into the whole model, then shard
            weights_loaded = True
        parallel.apply_fsdp(model, device, world, bf16=amp_dtype == torch.bfloat16)
        for frozen in stage.frozen:   # the same sharding, no optimizer: each rank keeps 1/world of them too
            parallel.apply_fsdp(frozen.to(device), device, world, bf16=amp_dtype == torch.bfloat16)
    optimizers = build_optimizers(model, cfg, n_embd)   # after sharding: the optimizers hold the shards
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_state is not None:
        state = _load_resume(stage, model, optimizers, out, resume_state, weights_loaded)
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens"], state.get("elapsed", 0.0)
    train_model = model
    if cfg.compile:
        train_model = torch.compile(model)
    if world > 1 and not fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    budget_s = cfg.minutes * 60
    if not cfg.steps and not budget_s:
        raise ConfigError("give a budget: --steps N or --minutes M")
    log = MetricsLog(out, cfg, start_step, is_main, f"{stage.name}:{out.name}")
    if is_main:
        _print_plan(stage, cfg, accum, micro_tokens, world)

    from tqdm import tqdm
    total = cfg.steps if cfg.steps else int(budget_s)
    bar = tqdm(total=total, initial=start_step if cfg.steps else int(elapsed_before), disable=not (cfg.progress and is_main),
               desc=stage.name, unit="step" if cfg.steps else "s", dynamic_ncols=True, leave=True)
    last: dict = {}

    def run_eval(step: int, tokens: int) -> None:
        model.eval()
        with torch.no_grad(), autocast(device, amp_dtype), parallel.unsharded(model):
            ev = stage.evaluate(model)
        ev = {k: round(float(v), 6) for k, v in ev.items()}
        last.update(ev)
        log.write({"step": step, "tokens": tokens, **ev})
        if is_main:
            bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))

    if stage.evaluate and stage.evaluate_at_start and start_step == 0:
        run_eval(0, 0)   # before the clock starts: the budget is for training
        last.clear()
    step, t0 = start_step, time.time()
    window_tokens, window_t = 0, time.time()
    interrupted = False

    clock = {"elapsed": elapsed_before}

    def tick() -> None:
        """Read the clock once per step; under DDP rank 0's clock decides, so all ranks stop together."""
        elapsed = elapsed_before + time.time() - t0
        if world > 1 and budget_s:
            t = torch.tensor([elapsed], dtype=torch.float64, device=device)
            torch.distributed.broadcast(t, 0)
            elapsed = float(t)
        clock["elapsed"] = elapsed

    def progress() -> float:
        p = step / cfg.steps if cfg.steps else 0.0
        if budget_s:
            p = max(p, clock["elapsed"] / budget_s)
        return p

    def state_now(finished: bool) -> dict:
        return {"step": step, "tokens": tokens_seen, "elapsed": elapsed_before + time.time() - t0,
                "data": stage.batches.state_dict() if hasattr(stage.batches, "state_dict") else None,
                "finished": finished, "last": last, "stage": stage.name}

    try:
        while progress() < 1.0 and (not cfg.steps or step < cfg.steps):
            tick()
            if progress() >= 1.0:
                break
            mult = lr_multiplier(progress(), cfg)
            set_lr(optimizers, mult)
            train_model.train()
            metrics_sum: dict[str, float] = {}
            for micro in range(accum):
                batch = next(stage.batches)
                sync = micro == accum - 1 or world == 1
                ctx = contextlib.nullcontext()
                if fsdp:   # FSDP2's no_sync: gradients accumulate unsharded, one reduce-scatter on the last micro-step
                    parallel.set_gradient_sync(model, sync)
                elif world > 1 and not sync:
                    ctx = train_model.no_sync()
                with ctx, autocast(device, amp_dtype):
                    loss, metrics = stage.loss_fn(train_model, batch)
                (loss / accum).backward()
                n_tok = stage.tokens_in(batch) * world
                tokens_seen += n_tok
                window_tokens += n_tok
                metrics_sum["loss"] = metrics_sum.get("loss", 0.0) + float(loss.detach()) / accum
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / accum
            if cfg.grad_clip > 0:
                trainable = [p for p in model.parameters() if p.requires_grad]
                gnorm = (parallel.clip_grad_norm(trainable, cfg.grad_clip) if fsdp   # the norm over every shard
                         else torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
                metrics_sum["grad_norm"] = float(gnorm)
            if not math.isfinite(metrics_sum["loss"]):
                raise ConfigError(f"loss became {metrics_sum['loss']} at step {step}: lower the learning rate")
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            tick()
            bar.n = step if cfg.steps else int(min(budget_s, elapsed_before + time.time() - t0))
            bar.set_postfix(loss=f"{metrics_sum['loss']:.3f}", refresh=False)
            bar.update(0)
            done = progress() >= 1.0 or (cfg.steps and step >= cfg.steps)
            if step % cfg.log_every == 0 or done or step == start_step + 1:
                if world > 1:  # log the mean over ranks, not rank 0's share of the batch
                    keys = sorted(k for k in metrics_sum if k != "grad_norm")
                    vals = torch.tensor([metrics_sum[k] for k in keys], dtype=torch.float64, device=device)
                    torch.distributed.all_reduce(vals)
                    metrics_sum.update({k: float(v) / world for k, v in zip(keys, vals.tolist())})
                dt = max(1e-9, time.time() - window_t)
                tps = window_tokens / dt
                record = {"step": step, "tokens": tokens_seen, "lr_mult": round(mult, 5),
                          "tok_per_s": round(tps, 1), "elapsed": round(elapsed_before + time.time() - t0, 2),
                          **{k: round(v, 6) for k, v in metrics_sum.items()}}
                if stage.corpus_tokens:
                    record["epochs"] = round(tokens_seen / stage.corpus_tokens, 4)
                mfu = _mfu(device, stage.flops_per_token, tps, world)
                if mfu is not None:
                    record["mfu"] = round(mfu, 4)
                window_tokens, window_t = 0, time.time()
                bar.set_postfix(loss=f"{metrics_sum['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=True)
                last.update(record)
                log.write(record)
            if stage.evaluate and ((cfg.eval_every and step % cfg.eval_every == 0) or done):   # 0: at the end only
                run_eval(step, tokens_seen)
            if stage.sample and cfg.sample_every and (step % cfg.sample_every == 0 or done) and (is_main or fsdp):
                model.eval()
                with torch.no_grad(), parallel.unsharded(model):   # under FSDP every rank gathers, rank 0 samples
                    if is_main:
                        bar.write(f"--- sample at step {step} ---\n{stage.sample(model)}\n---")
            if cfg.save_every and step % cfg.save_every == 0 and not done:
                save_checkpoint(stage, model, optimizers, out, state_now(False), is_main, fsdp)
            if stage.after_step:
                stage.after_step(step, metrics_sum)
    except KeyboardInterrupt:
        interrupted = True
    bar.close()
    seconds = elapsed_before + time.time() - t0
    last["train_seconds"] = round(seconds, 2)
    last["tok_per_s_mean"] = round(tokens_seen / max(seconds, 1e-9), 1)
    # throughput per stage, beside the machine it was measured on (the report compares it with the preset's plan);
    # wall clock over the whole stage, periodic evaluation included: what a time budget actually buys
    stage.run_config["throughput"] = {
        "steps": step, "tokens": tokens_seen, "seconds": round(seconds, 2),
        "tok_per_s": last["tok_per_s_mean"], "steps_per_minute": round(60 * step / max(seconds, 1e-9), 2),
        "budget": {"steps": cfg.steps, "minutes": cfg.minutes}}
    save_checkpoint(stage, model, optimizers, out, state_now(not interrupted), is_main, fsdp)
    if world > 1:
        torch.distributed.barrier()  # the other ranks wait until rank 0's checkpoint is on disk
    if interrupted:
        print(f"\ninterrupted at step {step}; checkpoint saved to {out} (continue with --resume)")
        raise KeyboardInterrupt
    return TrainResult(step, tokens_seen, seconds, last, interrupted)


def _guess_width(model) -> int:
    for p in model.parameters():
        if p.ndim == 2:
            return p.shape[1]
    return 768


def _print_plan(stage: Stage, cfg: TrainConfig, accum: int, micro_tokens: int, world: int) -> None:
    step_tokens = micro_tokens * accum
    lines = [f"[{stage.name}] out={cfg.out}  world={world}" + (f" ({cfg.parallel})" if world > 1 else "")
             + f"  batch={cfg.batch_size}x{cfg.seq_len}  accum={accum}  tokens/step={step_tokens:,}"
             f"  optimizer={cfg.optimizer}  schedule={cfg.schedule}"
             + ("  activation checkpointing" if cfg.activation_checkpointing else "")]
    if stage.n_params:
        lines.append(f"  parameters: {stage.n_params:,}" + (f"   FLOPs/token: {stage.flops_per_token:,.0f}" if stage.flops_per_token else ""))
    if cfg.steps:
        planned = cfg.steps * step_tokens
        lines.append(f"  budget: {cfg.steps} steps = {planned:,} tokens" + (f" (or {cfg.minutes} min)" if cfg.minutes else ""))
    else:
        lines.append(f"  budget: {cfg.minutes} minutes of training (the LR schedule follows the clock)")
    if stage.corpus_tokens:
        lines.append(f"  corpus: {stage.corpus_tokens:,} training tokens"
                     + (f"; {cfg.steps * step_tokens / stage.corpus_tokens:.2f} epochs planned" if cfg.steps else ""))
        if stage.n_params and cfg.steps:
            lines.append(f"  tokens : parameters = {cfg.steps * step_tokens / stage.n_params:.1f} : 1 (Chinchilla ~20 : 1)")
    print("\n".join(lines), flush=True)
