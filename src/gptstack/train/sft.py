"""Supervised finetuning: a pretrained run + conversations -> a chat model, through the shared loop.

    result = sft("runs/base", SFTConfig(out="runs/sft"))                 # full finetuning
    result = sft("runs/base", SFTConfig(out="runs/sft_lora", lora=True)) # LoRA adapter only (RUN/adapter/)

Data: the embedded task suite (`data="tasks"`, `examples_per_task` train-split examples of each task in
`tasks`, interleaved) or conversations from a JSONL file / `hf:NAME`. The loss is next-token cross-entropy
on assistant tokens only (content and <|assistant_end|>). With `pack`, several conversations share a row,
each with its own positions and a block-diagonal causal mask, so none sees another; without it each row holds
one conversation and the batch is cut to its longest row. Packing trains 2.0x as many assistant tokens per
second (task suite, tiny preset, batch 8x256, one CPU thread: 723 vs 360 tokens/s), so it is the default.

The loop's "tokens" for SFT are trained (assistant) tokens, so tok/s and epochs count what is learned from.

Two options change the objective or record it, both from the logits the step computes anyway:
`kl_to_base` = β adds β · KL(π || base) on the assistant tokens (base: the frozen starting model, one no-grad
forward per batch; with LoRA the adapters-disabled model), and `cartography` records each conversation's
confidence per visit (data/cartography.py) into RUN/cartography.jsonl, committed with every checkpoint.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from ..config import SFTConfig
from ..errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:  # torch and the loop are imported when training starts, so `gptstack --help` stays fast
    from .loop import TrainResult



# ---- data ---------------------------------------------------------------------------------------------------
def load_sft_data(cfg: SFTConfig) -> tuple[list[list[dict]], list[str], list[list[dict]], str]:
    """(train conversations, their labels (task, or the file's name), held-out conversations, a one-line
    description)."""
    if cfg.data == "tasks":
        from ..data.tasks import generate_mixture, parse_task_list, parse_task_weights

        names = parse_task_list(cfg.tasks)
        weights = parse_task_weights(cfg.tasks)
        train_ex = generate_mixture(cfg.tasks, "train", cfg.examples_per_task, cfg.seed)
        per_task = math.ceil(cfg.val_conversations / len(names)) if cfg.val_conversations else 0
        val_ex = generate_mixture(names, "test", per_task, cfg.seed + 1) if per_task else []
        shown = ", ".join(n if w == 1 else f"{n} x{w:g}" for n, w in weights.items())
        return ([e.messages for e in train_ex], [e.task for e in train_ex], [e.messages for e in val_ex],
                f"task suite: {shown} ({cfg.examples_per_task} train examples per unit of weight)")
    from ..data.chat import load_conversations

    convs = load_conversations(cfg.data, max_examples=cfg.max_examples or None)
    order = list(range(len(convs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = min(cfg.val_conversations, len(convs) // 10)  # never more than a tenth of a small file
    val = [convs[i] for i in order[:n_val]]
    train_convs = [convs[i] for i in sorted(order[n_val:])]   # file order: per-conversation records read like the file
    return (train_convs, [Path(cfg.data).stem] * len(train_convs), val,
            f"{cfg.data}: {len(convs)} conversations ({n_val} held out)")


def report_encoding(stats: dict, what: str) -> None:
    line = (f"{what}: {stats['kept']:,} conversations, {stats['tokens']:,} tokens, "
            f"{stats['trained_tokens']:,} trained (assistant) tokens")
    print(line, flush=True)
    if stats["truncated"] or stats["skipped"]:
        print(f"  warning: {stats['truncated']} conversations longer than the context were truncated after their "
              f"last complete assistant turn, {stats['skipped']} skipped (no assistant token fit); raise --seq-len "
              "or shorten them", flush=True)


# ---- loss ---------------------------------------------------------------------------------------------------
def sft_inputs(batch: dict, dev):
    """(input ids, targets, example ids or None, forward kwargs) of a batch. Packed rows get per-conversation
    positions and a block-diagonal causal mask. Unpacked rows hold one conversation from position 0 with
    padding only after it, so the plain causal path is exact, and trailing padding columns are cut off."""
    from ..data.chat import block_causal_mask

    doc_ids = batch["doc_ids"]
    cols = doc_ids.shape[1]
    kw = {}
    if int(doc_ids.max()) > 0:   # some row holds more than one conversation
        kw = {"position_ids": batch["position_ids"].to(dev), "attn_mask": block_causal_mask(doc_ids.to(dev))}
    else:
        cols = int((doc_ids >= 0).sum(dim=1).max())  # trailing padding columns do no work
    ex = batch.get("example_ids")
    return (batch["input_ids"][:, :cols].to(dev), batch["targets"][:, :cols].to(dev),
            ex[:, :cols].to(dev) if ex is not None else None, kw)


def sft_loss(model, batch: dict):
    """Mean next-token cross-entropy over the trained (assistant) targets of the batch; targets -1 are not
    trained."""
    dev = next(p for p in model.parameters()).device
    x, y, _, kw = sft_inputs(batch, dev)
    return masked_ce(model, x, y, **kw), {}


def trained_logits(model, x, y, **kw):
    """(N, V) logits at the N trained positions (y >= 0), the head run only there (see masked_ce); under DDP
    the wrapper's forward gives all positions' logits, and those are selected."""
    import torch

    keep = y >= 0
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or not hasattr(model, "hidden_states"):
        return model(x, **kw)[keep]
    return model.lm_head(model.hidden_states(x, **kw)[keep])


class SFTObjective:
    """The training step's loss: plain `sft_loss`, or with β > 0 the KL-anchored loss (losses.anchored_ce),
    and with a recorder each conversation's visit recorded from the same log-probabilities.

    `base` is the frozen starting model; None with β > 0 means the policy is a PEFT model whose base is
    itself with the adapters disabled. `index_of[i]` is the data-set index of encoded conversation i."""

    def __init__(self, kl_to_base: float = 0.0, base=None, recorder=None, index_of: list[int] | None = None):
        self.kl_to_base, self.base, self.recorder, self.index_of = kl_to_base, base, recorder, index_of

    def __call__(self, model, batch: dict):
        from .losses import anchored_ce

        if not self.kl_to_base and self.recorder is None:
            return sft_loss(model, batch)
        dev = next(p for p in model.parameters()).device
        x, y, ex, kw = sft_inputs(batch, dev)
        logits = trained_logits(model, x, y, **kw)
        gold = y[y >= 0]
        base_logits = self.base_logits(model, x, y, kw) if self.kl_to_base else None
        loss, token_logp, kl = anchored_ce(logits, gold, base_logits, self.kl_to_base)
        metrics = {} if kl is None else {"ce": float(-token_logp.detach().mean()), "kl_to_base": float(kl.detach())}
        if self.recorder is not None:
            self.record(logits.detach(), gold, token_logp.detach(), ex[y >= 0])
        return loss, metrics

    def base_logits(self, model, x, y, kw):
        import torch

        with torch.no_grad():
            if self.base is not None:
                return trained_logits(self.base, x, y, **kw)
            peft = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            with peft.disable_adapter():
                return trained_logits(peft, x, y, **kw)

    def record(self, logits, gold, token_logp, example_ids) -> None:
        """Per conversation in the batch: confidence exp(mean log p(gold)), token accuracy, exact match."""
        import torch

        uniq, inv = torch.unique(example_ids, return_inverse=True)
        count = torch.bincount(inv, minlength=len(uniq)).double()
        mean_logp = torch.zeros(len(uniq), dtype=torch.float64, device=inv.device).index_add_(
            0, inv, token_logp.double()) / count
        hits = (logits.argmax(-1) == gold).double()
        acc = torch.zeros_like(mean_logp).index_add_(0, inv, hits) / count
        self.recorder.record([self.index_of[i] for i in uniq.tolist()], mean_logp.exp().tolist(),
                             (acc == 1).double().tolist(), acc.tolist())


def masked_ce(model, x, y, **kw):
    """model(x, y, **kw), but the vocabulary projection runs only at trained positions: in SFT most positions
    are prompt or padding, and the head is a large share of a small model's FLOPs. Under DDP the wrapper's
    forward must run (it prepares the gradient all-reduce), so there the plain forward is used."""
    import torch
    import torch.nn.functional as F

    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or not hasattr(model, "hidden_states"):
        return model(x, y, **kw)
    h = model.hidden_states(x, **kw)
    keep = y >= 0
    logits = model.lm_head(h[keep])
    return F.cross_entropy(logits.float(), y[keep])


def trained_tokens(batch: dict) -> int:
    return int((batch["targets"] >= 0).sum())


def masked_val_loss(model, batches: list[dict]) -> dict:
    """Mean CE over the assistant tokens of the held-out batches (summed, then divided once)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = trained_tokens(batch)
            loss, _ = sft_loss(model, batch)
            total += float(loss) * n
            count += n
    return {"val_loss": total / max(1, count)}


def fixed_batches(encoded, batch_size: int, seq_len: int, pack: bool, seed: int) -> list[dict]:
    """About one pass over `encoded` as a fixed list of batches (the held-out set)."""
    from ..data.chat import ChatBatches

    if not encoded:
        return []
    it = ChatBatches(encoded, batch_size, seq_len, seed, pack=pack)
    out = []
    while it.epochs_done < 1.0 and len(out) < 1000:
        out.append(next(it))
    return out


# ---- model --------------------------------------------------------------------------------------------------
def load_parent(run_dir: str | Path, device):
    """The parent run's model (adapters merged into a plain GPT), tokenizer and config."""
    from ..runs import load_model, read_config

    config = read_config(run_dir)
    if config.get("kind", "lm") != "lm" or "model" not in config:
        raise CheckpointError(f"'{run_dir}' is not a language-model run (kind={config.get('kind')!r}); SFT starts "
                              "from a pretraining or SFT run")
    model, tokenizer, config = load_model(run_dir, device)
    if hasattr(model, "merge_and_unload"):  # an adapter run: continue from its merged weights
        from ..model.adapters import merge_adapter

        model = merge_adapter(model)
    return model, tokenizer, config


def sft(run_dir: str | Path, cfg: SFTConfig) -> TrainResult:
    from ..devices import resolve_device
    from ..data.chat import ChatBatches, encode_conversations
    from ..model.gpt import core_gpt
    from ..runs import load_policy_state, run_config, save_policy
    from .loop import Stage, distributed_context, train

    parent = Path(run_dir)
    rank, world, _ = distributed_context()
    main = rank == 0
    lora = cfg.lora or cfg.qlora
    device = resolve_device(cfg.device)
    model, tokenizer, parent_config = load_parent(parent, device)
    mcfg = model.config
    if not cfg.seq_len:
        cfg = replace(cfg, seq_len=mcfg.seq_len)
    if cfg.seq_len > mcfg.seq_len * 4:
        raise ConfigError(f"--seq-len {cfg.seq_len} is beyond what the model's position tables cover "
                          f"({4 * mcfg.seq_len})")
    cfg.validate()
    if lora and "adapter" in parent_config and parent_config.get("adapter"):
        raise ConfigError(f"'{parent}' is itself an adapter run: merge it first (gptstack merge {parent} --out DIR) "
                          "and train the new adapter on the merged run")

    if cfg.cartography and world > 1:
        raise ConfigError("--cartography records on one process (its per-conversation record is checkpointed by "
                          "rank 0): run it without torchrun")
    train_convs, labels, val_convs, described = load_sft_data(cfg)
    perm = list(range(len(train_convs)))
    if cfg.order != "random":
        perm, note = curriculum_permutation(train_convs, cfg)
        described += f"; curriculum {cfg.order}" + note
    if main:
        print(f"data: {described}", flush=True)
    kept: list[int] = []   # encoding keeps the order of what it keeps; kept[i]: position of encoded[i] in perm
    encoded, stats = encode_conversations(tokenizer, [train_convs[i] for i in perm], cfg.seq_len + 1, kept)
    if not encoded:
        raise DataError(f"no conversation fits the context of {cfg.seq_len} tokens with an assistant token in it")
    val_encoded, val_stats = encode_conversations(tokenizer, val_convs, cfg.seq_len + 1) if val_convs else ([], None)
    if main:
        report_encoding(stats, "train")
        if val_stats:
            report_encoding(val_stats, "held out")

    adapter_info = None
    n_base = sum(p.numel() for p in model.parameters())  # counted before 4-bit packing halves the numel
    if lora:
        from ..model.adapters import apply_lora, parse_targets, quantize_4bit

        if cfg.qlora:
            quantize_4bit(model)
        import torch

        torch.manual_seed(cfg.seed)  # LoRA's A factors start random: the same seed gives the same adapter
        # Pretraining never showed the chat tokens: their embeddings are random and the head has learned to
        # rank them last. With both frozen the model cannot learn to end a reply (measured: <|assistant_end|>
        # stays at ~7 nats), so their rows train too, as PEFT trainable tokens (a few rows, saved in the adapter).
        specials = sorted(set(tokenizer.special_ids.values())) if cfg.lora_train_specials else []
        targets = parse_targets(cfg.lora_targets)
        # a module that gets LoRA factors itself (lm_head / embed_tokens when listed) needs no token rows
        token_rows = {m: specials for m in ("embed_tokens", "lm_head") if specials and m not in targets}
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets,
                           trainable_tokens=token_rows or None)
        adapter_info = {"lora": True, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                        "targets": parse_targets(cfg.lora_targets), "qlora": cfg.qlora,
                        "trainable_tokens": specials,
                        "quant_type": "nf4" if cfg.qlora else None}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = n_base + (n_trainable if lora else 0)
    if main:
        kind = "QLoRA (nf4 base)" if cfg.qlora else "LoRA" if lora else "full finetuning"
        print(f"{kind}: {n_trainable:,} trainable of {n_total:,} parameters "
              f"({100 * n_trainable / max(1, n_total):.2f}%)", flush=True)

    batches = ChatBatches(encoded, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, pack=cfg.pack,
                          pad_id=tokenizer.bos_id,
                          order=list(range(len(encoded))) if cfg.order != "random" else None)
    val_batches = fixed_batches(val_encoded, cfg.batch_size, cfg.seq_len, cfg.pack, cfg.seed)
    config = run_config("sft", model, tokenizer, cfg, parent.resolve(), adapter=adapter_info,
                        data={"source": described, "train": stats, "held_out": val_stats})
    recorder = None
    if cfg.cartography:
        from ..data.cartography import CartographyRecorder

        recorder = CartographyRecorder(train_convs, labels)
    base = None
    if cfg.kl_to_base and not lora:
        from .rl import frozen_reference

        base = frozen_reference(model)   # the starting weights, before any step
    objective = SFTObjective(cfg.kl_to_base, base, recorder, [perm[k] for k in kept])
    stage = Stage(name="sft", model=model, batches=batches, loss_fn=objective, run_config=config,
                  tokenizer=tokenizer, tokens_in=trained_tokens,
                  evaluate=(lambda m: masked_val_loss(m, val_batches)) if val_batches else None,
                  flops_per_token=core_gpt(model).flops_per_token(cfg.seq_len),
                  corpus_tokens=stats["trained_tokens"], n_params=n_trainable)
    if lora:
        stage.save, stage.load = save_policy, load_policy_state
    if base is not None:
        stage.frozen = [base]
    if recorder is not None:
        keep_cartography(stage, recorder, {"data": described, "seq_len": cfg.seq_len, "seed": cfg.seed})
    return train(stage, cfg)


def curriculum_permutation(train_convs, cfg: SFTConfig) -> tuple[list[int], str]:
    """The fixed order of every epoch: by distance from the MiniLM centroid, or by a cartography file's
    confidence (refused when it was recorded on other data); and a note for the data line."""
    from ..data.datamap import centroid_distances, curriculum_order, embed_conversations

    if cfg.order in ("easy-first", "hard-first"):
        from ..data.cartography import confidences_for

        keys = confidences_for(train_convs, cfg.cartography_from)
        unseen = sum(k is None for k in keys)
        note = f" (confidence from {cfg.cartography_from}" + (f"; {unseen} never trained on there go last)"
                                                              if unseen else ")")
        return curriculum_order(keys, cfg.order, cfg.seed), note
    return curriculum_order(centroid_distances(embed_conversations(train_convs)), cfg.order, cfg.seed), ""


def keep_cartography(stage, recorder, meta: dict) -> None:
    """The record travels with every checkpoint: its state in trainer_state.json (exact resume) and
    cartography.jsonl written into the same staged commit as the weights."""
    save = stage.save

    def save_with_cartography(model, tmp, cid):
        save(model, tmp, cid)
        recorder.write(Path(tmp) / "cartography.jsonl", meta)

    stage.save = save_with_cartography
    stage.extra_state = lambda: {"cartography": recorder.state_dict()}
    stage.load_extra_state = lambda state: recorder.load_state_dict(state["cartography"]) \
        if "cartography" in state else None
