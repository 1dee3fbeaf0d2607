"""FSDP2 for the training loop: sharding the model, its checkpoints (DCP) and its inference moments.

`--parallel fsdp` under torchrun shards every Transformer block, then the root (embeddings, final norm,
head, and with PEFT the trainable token rows), with `torch.distributed.fsdp.fully_shard`: each rank keeps
1/world of every parameter, gradient and optimizer state (dim 0 of each tensor, as DTensors) and
all-gathers a block's weights just before its forward and backward. LoRA factors live inside the blocks and
are sharded with them (FSDP2 mixes frozen and trainable parameters in one group); QLoRA's 4-bit bases are
refused. On CUDA the all-gathered copies are bf16 and gradients are reduced in fp32
(`MixedPrecisionPolicy`); on CPU everything stays fp32.

Checkpoints (`save_dcp` / `load_dcp`): model and optimizer state are written sharded by every rank with
`torch.distributed.checkpoint` into RUN/.staging-*/dcp/ of the loop's one checkpoint commit (io.py): rank 0
opens the commit, every rank writes its shards, and rank 0 commits after a barrier. DCP reshards on load, so
a run saved by 2 ranks resumes in 1 process or on 4. Frozen weights (a LoRA base) are not in it: they come
from the parent run. `full_model_state` consolidates the weights on rank 0 (cpu offload) so model.safetensors
(or adapter/) is written as in any other run, and every other command reads it as before.

Evaluation and samples under FSDP run on `unsharded(model)`: every weight all-gathered once, then forward
passes without collectives, so ranks may run different numbers of evaluation batches and rank 0 may sample
alone. That costs the full weights on each rank for the duration (as DDP holds them all the time).

Frozen models a stage holds (the DPO/RL reference, the distillation teacher: `Stage.frozen`) are sharded the
same way and get no optimizer; their forwards all-gather block by block like the trained model's, so every
rank must call them equally often (each stage calls them once per step or per rollout). RL and on-policy
distillation sample under `unsharded(model)` (decode lengths differ between ranks), every rank the whole
rollout with the same seed (the samples of one process), and then keep their share of the rows
(`rank_rows`) for the log-probabilities, the values and the update; `token_share` turns a rank's per-token
mean into its share of the global one, so the averaged gradient is the one process's gradient.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..model.gpt import core_gpt

# the stages whose save/load and losses are known to work sharded (Stage.name, or its prefix before "-")
FSDP_STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "ppo", "distill")
DCP_DIR = "dcp"


def check_parallel(cfg, stage_name: str, world: int, run_config: dict) -> None:
    """Settings FSDP cannot honour, each a one-line ConfigError before anything is built."""
    if cfg.parallel != "fsdp":
        return
    if stage_name.split("-")[0] not in FSDP_STAGES:
        raise ConfigError(f"--parallel fsdp is not supported yet for this stage ({stage_name}): train it with "
                          "--parallel ddp (the default)")
    if world <= 1:   # (TrainConfig.validate refuses this from the environment before anything is built)
        raise ConfigError("--parallel fsdp needs a process group of 2 or more ranks")
    if (run_config.get("adapter") or {}).get("qlora"):
        raise ConfigError("--parallel fsdp cannot shard a 4-bit (QLoRA) base yet: use --lora, or --parallel ddp")
    if cfg.compile:
        raise ConfigError("--parallel fsdp with --compile is not supported yet: drop one of them")


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing of every Transformer block: its activations are recomputed in the backward
    pass instead of kept. The block's own `forward` is wrapped on the instance, so parameter names (and every
    checkpoint) stay as they are; inference and evaluation (no grad) run the plain forward."""
    from torch.utils.checkpoint import checkpoint

    for block in core_gpt(model).layers:
        if getattr(block, "_gptstack_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, _block=block, **kwargs):
            if torch.is_grad_enabled() and _block.training:
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._gptstack_checkpointed = True


def env_rank() -> tuple[int, int]:
    """(global rank, world size) from torchrun's environment: what a stage's data split needs before the loop
    has created the process group."""
    return int(os.environ.get("RANK", 0) or 0), int(os.environ.get("WORLD_SIZE", 1) or 1)


def fsdp_data_split(cfg) -> tuple[int, int]:
    """(rank, world) over which reward/DPO pair batches and RL / on-policy distillation rollouts are split:
    FSDP's ranks under torchrun, else (0, 1). Under DDP every rank keeps the whole batch, as before: DPO's and
    RL's losses read log-probabilities through the core GPT, past DDP's forward, so DDP would not average
    their gradients, and ranks with different rows would drift apart."""
    rank, world = env_rank()
    return (rank, world) if getattr(cfg, "parallel", "ddp") == "fsdp" and world > 1 else (0, 1)


def rank_rows(n_groups: int, group: int, rank: int, world: int) -> slice:
    """The rows of rank `rank`: whole groups (a prompt's samples stay together, GRPO compares within them),
    n_groups / world of them (the configs refuse a world that does not divide n_groups)."""
    per = n_groups // world
    return slice(rank * per * group, (rank + 1) * per * group)


def all_sum(values: list[float], device="cpu") -> list[float]:
    """Element-wise sums over the ranks (float64); the values themselves without a process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def token_share(counts: list[float], device="cpu") -> list[float]:
    """world x (this rank's tokens / all ranks' tokens) for each entry: a rank's per-token mean loss times
    it, averaged over the ranks (the gradient reduction), is the mean over every rank's tokens; 1.0 alone."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [1.0] * len(counts)
    totals = all_sum(counts, device)
    world = dist.get_world_size()
    return [world * c / t if t else 1.0 for c, t in zip(counts, totals)]


def apply_fsdp(model: torch.nn.Module, device: torch.device, world: int, bf16: bool) -> torch.nn.Module:
    """fully_shard each block, then the root, in place; returns the model (now an FSDPModule). Used for
    frozen models too (they simply get no optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # a head's output (reward model: head(h).squeeze(-1)) is a view; no caller modifies one in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh}
    if device.type == "cuda" and bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in core_gpt(model).layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    _hidden_states_as_forward(model)
    return model


def _hidden_states_as_forward(model) -> None:
    """SFT computes the head only at trained positions (sft.masked_ce: model.hidden_states, then lm_head), and
    RL / DPO / distillation read log-probabilities the same way (heads.response_logprobs: the core GPT's
    hidden_states, then lm_head), so a call of the GPT's hidden_states from outside the root's forward must
    gather the root's weights as forward does; the core GPT's (and the root's) `hidden_states` is replaced by
    one that runs between the root's FSDP hooks. From inside the root's forward (GPT.forward, a reward model's
    or a value head's forward) it must not: FSDP's hooks would run twice, and the inner post-forward would
    leave the outer one to reshard the root after every forward (and all-gather it again for the backward)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    gpt = core_gpt(model)

    depth = [0]

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    model.register_forward_pre_hook(enter, prepend=True)
    model.register_forward_hook(leave)
    plain = type(gpt).hidden_states.__get__(gpt)   # the class's method: never an earlier wrapper
    object.__setattr__(model, "_gptstack_hidden_states", plain)
    register_fsdp_forward_method(model, "_gptstack_hidden_states")   # plain, between the root's FSDP hooks
    hooked = model._gptstack_hidden_states

    def hidden_states(*args, **kwargs):
        return (plain if depth[0] else hooked)(*args, **kwargs)

    object.__setattr__(gpt, "hidden_states", hidden_states)
    if gpt is not model and "hidden_states" in dir(type(model)):   # a root with a method of its own name
        object.__setattr__(model, "hidden_states", hidden_states)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model, sync: bool) -> None:
    """Gradient accumulation without communication: the reduce-scatter runs on the last micro-step only."""
    model.set_requires_gradient_sync(sync)


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """The global gradient norm across every shard of every parameter, and clipping by it."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):   # a partial norm per rank: full_tensor() reduces it to the global one
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@contextlib.contextmanager
def unsharded(model):
    """Every weight all-gathered for the duration, and no collective in any forward: for evaluation (ranks
    may see different numbers of batches) and samples (rank 0 alone). A no-op without FSDP."""
    if not is_fsdp(model):
        yield
        return
    fsdp_modules = [m for m in model.modules() if is_fsdp(m)]
    model.set_reshard_after_forward(False)
    for m in fsdp_modules:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
        model.set_reshard_after_forward(True)                 # the blocks: free their weights after forward
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps them for the backward (FSDP's default)


# ---- checkpoints ---------------------------------------------------------------------------------------------

def _options(model, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    # a LoRA base is frozen and comes from the parent run: only what trains goes into the checkpoint
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen, **kw)


def save_dcp(model, optimizers, directory: Path, checkpoint_id: str) -> None:
    """Every rank writes its shards of the model and optimizer state under `directory` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizers, options=_options(model))
    dcp.save({"model": msd, "optim": osd, "checkpoint_id": checkpoint_id}, checkpoint_id=str(directory))


def load_dcp(model, optimizers, directory: Path, checkpoint_id: str | None) -> None:
    """Load a DCP checkpoint into `model` and `optimizers`, sharded or not, at any world size: DCP reads the
    slices each rank needs (resharding). Without a process group it loads in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / ".metadata").exists():
        raise CheckpointError(f"cannot resume: '{directory}' holds no DCP checkpoint (.metadata is missing)")
    options = _options(model)
    msd, osd = get_state_dict(model, optimizers, options=options)
    state = {"model": msd, "optim": osd, "checkpoint_id": ""}
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as e:   # a missing key, a shape that does not fit, a truncated shard
        first = str(e).strip().splitlines()
        raise CheckpointError(f"cannot resume from '{directory}': {type(e).__name__}"
                              + (f" ({first[-1][:200]})" if first else "")) from None
    if checkpoint_id and state["checkpoint_id"] != checkpoint_id:
        raise CheckpointError(f"cannot resume: '{directory.parent}' holds sharded state and trainer state from "
                              "different saves")
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)


def shard_optimizer_state(optimizers, saved: list[dict]) -> list[dict]:
    """optimizer.pt of an unsharded run (full tensors, keyed by parameter index) for sharded parameters: each
    state tensor shaped like its parameter becomes that parameter's local shard (a run saved by one process
    resumed under FSDP)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = []
    for opt, sd in zip(optimizers, saved):
        params = [p for g in opt.param_groups for p in g["params"]]
        state = {}
        for idx, s in sd["state"].items():
            p = params[int(idx)]
            state[idx] = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                              if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v)
                          for k, v in s.items()}
        out.append({"state": state, "param_groups": sd["param_groups"]})
    return out


def full_model_state(model) -> dict:
    """The whole model's tensors on rank 0's CPU (an empty dict on the others): collective. With a frozen
    base (LoRA) only the trainable tensors, which is all an adapter save reads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(model, full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def state_dict_view(model, full: dict):
    """model.state_dict() and every submodule's return slices of `full` for the duration, so a stage's save
    callback (runs.save_policy: model.safetensors, or a PEFT adapter) writes the consolidated weights of a
    sharded model without knowing about FSDP."""
    patched = []
    for prefix, module in model.named_modules():
        head = prefix + "." if prefix else ""
        sub = {k[len(head):]: v for k, v in full.items() if k.startswith(head)}
        module.state_dict = (lambda sub: lambda *a, **kw: dict(sub))(sub)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.state_dict


def broadcast_object(obj, src: int = 0):
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src)
    return holder[0]
