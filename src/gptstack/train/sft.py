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
def load_sft_data(cfg: SFTConfig) -> tuple[list[list[dict]], list[list[dict]], str]:
    """(train conversations, held-out conversations, a one-line description)."""
    if cfg.data == "tasks":
        from ..data.tasks import generate_mixture, parse_task_list, parse_task_weights

        names = parse_task_list(cfg.tasks)
        weights = parse_task_weights(cfg.tasks)
        train_ex = generate_mixture(cfg.tasks, "train", cfg.examples_per_task, cfg.seed)
        per_task = math.ceil(cfg.val_conversations / len(names)) if cfg.val_conversations else 0
        val_ex = generate_mixture(names, "test", per_task, cfg.seed + 1) if per_task else []
        shown = ", ".join(n if w == 1 else f"{n} x{w:g}" for n, w in weights.items())
        return ([e.messages for e in train_ex], [e.messages for e in val_ex],
                f"task suite: {shown} ({cfg.examples_per_task} train examples per unit of weight)")
    from ..data.chat import load_conversations

    convs = load_conversations(cfg.data, max_examples=cfg.max_examples or None)
    order = list(range(len(convs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = min(cfg.val_conversations, len(convs) // 10)  # never more than a tenth of a small file
    val = [convs[i] for i in order[:n_val]]
    train_convs = [convs[i] for i in order[n_val:]]
    return train_convs, val, f"{cfg.data}: {len(convs)} conversations ({n_val} held out)"


def report_encoding(stats: dict, what: str) -> None:
    line = (f"{what}: {stats['kept']:,} conversations, {stats['tokens']:,} tokens, "
            f"{stats['trained_tokens']:,} trained (assistant) tokens")
    print(line, flush=True)
    if stats["truncated"] or stats["skipped"]:
        print(f"  warning: {stats['truncated']} conversations longer than the context were truncated after their "
              f"last complete assistant turn, {stats['skipped']} skipped (no assistant token fit); raise --seq-len "
              "or shorten them", flush=True)


# ---- loss ---------------------------------------------------------------------------------------------------
def sft_loss(model, batch: dict):
    """Mean next-token cross-entropy over the trained (assistant) targets of the batch; targets -1 are not
    trained. Packed rows get per-conversation positions and a block-diagonal causal mask. Unpacked rows
    hold one conversation from position 0 with padding only after it, so the plain causal path is exact."""
    from ..data.chat import block_causal_mask

    dev = next(p for p in model.parameters()).device
    doc_ids = batch["doc_ids"]
    if int(doc_ids.max()) > 0:   # some row holds more than one conversation
        x, y = batch["input_ids"].to(dev), batch["targets"].to(dev)
        kw = {"position_ids": batch["position_ids"].to(dev), "attn_mask": block_causal_mask(doc_ids.to(dev))}
    else:
        used = int((doc_ids >= 0).sum(dim=1).max())  # trailing padding columns do no work
        x, y = batch["input_ids"][:, :used].to(dev), batch["targets"][:, :used].to(dev)
        kw = {}
    return masked_ce(model, x, y, **kw), {}


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

    train_convs, val_convs, described = load_sft_data(cfg)
    if cfg.order != "random":
        from ..data.datamap import centroid_distances, curriculum_order, embed_conversations

        # the data map's order, fixed for every epoch (encoding keeps the order of what it keeps)
        perm = curriculum_order(centroid_distances(embed_conversations(train_convs)), cfg.order, cfg.seed)
        train_convs = [train_convs[i] for i in perm]
        described += f"; curriculum {cfg.order}"
    if main:
        print(f"data: {described}", flush=True)
    encoded, stats = encode_conversations(tokenizer, train_convs, cfg.seq_len + 1)
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
    stage = Stage(name="sft", model=model, batches=batches, loss_fn=sft_loss, run_config=config,
                  tokenizer=tokenizer, tokens_in=trained_tokens,
                  evaluate=(lambda m: masked_val_loss(m, val_batches)) if val_batches else None,
                  flops_per_token=core_gpt(model).flops_per_token(cfg.seq_len),
                  corpus_tokens=stats["trained_tokens"], n_params=n_trainable)
    if lora:
        stage.save, stage.load = save_policy, load_policy_state
    return train(stage, cfg)
