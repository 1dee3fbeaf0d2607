"""Pretraining: corpus -> tokenizer -> token shards -> GPT, through the shared loop.

The loss is next-token cross-entropy; the evaluation is validation bits per byte on held-out documents
(whole plays, for the default corpus). Everything else is the loop's business.
"""

from __future__ import annotations

import time
from dataclasses import replace
from ..config import PretrainConfig
from ..model.gpt import model_config_from_depth
from ..data.corpus import corpus_fingerprint, gptstack_home, load_corpus, split_documents
from ..data.loader import TokenBatches, sequential_batches
from ..data.shards import build_shards
from ..errors import ConfigError
from ..eval.bpb import evaluate_bpb, token_bytes_tensor
from ..model.gpt import GPT
from ..tokenizer import Tokenizer
from ..runs import load_tokenizer, run_config
from .loop import Stage, TrainResult, distributed_context, train

SAMPLE_PROMPTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords,"]


def lm_loss(model, batch):
    return model(batch["input_ids"], batch["targets"]), {}


def get_tokenizer(cfg: PretrainConfig, train_docs) -> Tokenizer:
    """Reuse --tokenizer, else train one on the training documents (cached by corpus and vocab size)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    key = f"{corpus_fingerprint(train_docs)}-{cfg.vocab_size}"
    cached = gptstack_home() / "tokenizers" / key
    if (cached / "meta.json").exists():
        return Tokenizer.load(cached)
    t0 = time.time()
    tok = Tokenizer.train((d.text for d in train_docs), cfg.vocab_size)
    print(f"trained a {tok.vocab_size}-token BPE tokenizer in {time.time() - t0:.1f}s")
    tok.save(cached)
    return tok


def sample_texts(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 48, seed: int = 0) -> list[str]:
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams

    engine = Engine(model, tokenizer)
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    out = engine.generate(ids, SamplingParams(temperature=0.8, top_k=50, max_tokens=max_tokens, seed=seed,
                                              stop_token_ids=[tokenizer.bos_id]))
    return [p + o[0].text for p, o in zip(prompts, out)]


def pretrain(cfg: PretrainConfig) -> TrainResult:
    cfg.validate()
    rank, world, _ = distributed_context()
    docs = load_corpus(cfg.corpus, cfg.text_field)
    train_docs, val_docs = split_documents(docs, cfg.val_frac, cfg.seed)
    tokenizer = get_tokenizer(cfg, train_docs)
    shards = build_shards(tokenizer, train_docs, val_docs, progress=cfg.progress and rank == 0)
    mcfg = model_config_from_depth(cfg.depth, tokenizer.vocab_size, cfg.seq_len,
                                   n_embd=cfg.n_embd or None, n_kv_head=cfg.n_kv_head or None,
                                   qk_norm=cfg.qk_norm, tie_embeddings=cfg.tie_embeddings)
    model = GPT(mcfg)
    model.init_weights(cfg.seed)
    step_tokens = max(cfg.total_batch_tokens, cfg.batch_size * cfg.seq_len * world)
    if not cfg.steps and not cfg.minutes:
        cfg = replace(cfg, steps=max(1, int(cfg.tokens_per_param * model.num_params() / step_tokens)))
    # batches are built on the CPU from the memmap; the loss moves them to wherever the model lives
    batches = TokenBatches(shards.tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    if shards.val_tokens < cfg.seq_len + 1:
        raise ConfigError(f"the validation split has only {shards.val_tokens} tokens; raise --val-frac")
    token_bytes = token_bytes_tensor(tokenizer)

    def evaluate(m):
        dev = next(m.parameters()).device
        return evaluate_bpb(m, sequential_batches(shards.tokens("val"), cfg.batch_size, cfg.seq_len,
                                                  cfg.eval_tokens, rank, world, dev), token_bytes)

    def sample(m):
        return "\n---\n".join(sample_texts(m, tokenizer))

    config = run_config("pretrain", model, tokenizer, cfg, None,
                        data={k: shards.meta[k] for k in ("train_tokens", "val_tokens", "train_bytes", "val_bytes",
                                                          "train_docs", "val_docs", "val_names", "unique_token_types")})
    if rank == 0:
        m = shards.meta
        print(f"corpus: {m['train_docs']} training documents ({m['train_tokens']:,} tokens, "
              f"{m['train_bytes'] / max(1, m['train_tokens']):.2f} bytes/token, {m['unique_token_types']:,} distinct "
              f"token types), {m['val_docs']} held out ({m['val_tokens']:,} tokens)")
    def loss_on_model_device(m, batch):
        dev = next(m.parameters()).device
        return lm_loss(m, {k: v.to(dev, non_blocking=True) for k, v in batch.items()})

    stage = Stage(name="pretrain", model=model, batches=batches, loss_fn=loss_on_model_device, run_config=config,
                  tokenizer=tokenizer, evaluate=evaluate, sample=sample,
                  flops_per_token=model.flops_per_token(cfg.seq_len), corpus_tokens=shards.train_tokens,
                  n_params=model.num_params())
    return train(stage, cfg)
