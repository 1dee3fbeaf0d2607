"""A decoder-only Transformer in the Llama parameter layout.

    tokens -> embed_tokens -> [ x + attn(rmsnorm(x)); x + swiglu(rmsnorm(x)) ] * n_layer -> norm -> lm_head

Parameter names follow Hugging Face's LlamaForCausalLM (`layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...), so
PEFT targets the usual module names and weights map 1:1 onto Llama checkpoints (QK-norm aside, which is Qwen3's).
Attention is `scaled_dot_product_attention` (flash kernels on GPU); grouped-query attention when
n_kv_head < n_head. One forward serves training (full sequences, optional per-row position ids and a
block-diagonal mask for packed conversations) and generation (a preallocated KV cache, see `KVCache`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    mlp_hidden: int = 768      # SwiGLU hidden width (≈ 8/3 · n_embd, rounded to a multiple of 64)
    seq_len: int = 256         # the context length the model is trained for
    rope_theta: float = 10000.0
    qk_norm: bool = True
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    # what imported models need (Hugging Face configs; see hub/): a head width other than n_embd / n_head,
    # biases on the q/k/v (Qwen2) and output (Llama's attention_bias) projections, and RoPE frequency scaling
    attn_head_dim: int = 0     # 0: n_embd // n_head
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: dict | None = None   # {"rope_type": "linear" | "llama3", "factor": ..., ...}

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # under bf16 autocast the QK-norm sees bf16 activations; a weight of the same dtype keeps the fused kernel
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """RoPE's per-pair rotation frequencies, with the scalings imported models use: `linear` (positions
    divided by `factor`) and Llama 3's (long wavelengths slowed by `factor`, short ones kept, a smooth ramp
    between `low_freq_factor` and `high_freq_factor` of the original context)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(head_dim: int, max_pos: int, theta: float, scaling: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, 1, T, D/2). Rotate halves (Llama/HF convention).
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Preallocated keys/values for generation: (n_layer, B, n_kv_head, max_len, head_dim).

    All rows write at the same position `pos` (prompts are left-padded by the engine); `valid[b, t]` marks
    real tokens, so padding is never attended to. `expand(n)` repeats each row n times, which lets n samples
    of one prompt share one prefill."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = 0
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def expand(self, n: int) -> None:
        if n == 1:
            return
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.valid = self.valid.repeat_interleave(n, dim=0)

    def grow(self, extra: int) -> None:
        """Make room for `extra` more positions (a fast-forward step can use more columns than a row gains)."""
        if extra <= 0:
            return
        pad = list(self.k.shape)
        pad[3] = extra
        self.k = torch.cat([self.k, self.k.new_zeros(pad)], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(pad)], dim=3)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], dim=1)
        self.max_len += extra

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (drop finished sequences so decode does no wasted work)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.valid = self.valid[rows]


NO_MASK = "no-mask"


def cache_attention_mask(cache: KVCache, T: int, new_valid=None):
    """Mark the T incoming positions valid (or as `new_valid` says) and return the attention mask for
    them: causal within the chunk, and never onto invalid (padding) keys. A query may always see itself,
    so a padding row never has an all-masked softmax (its output is unused anyway)."""
    p = cache.pos
    cache.valid[:, p:p + T] = True if new_valid is None else new_valid
    if T == 1 and new_valid is None and p > 0 and bool(cache.valid[:, :p].all()):
        return NO_MASK
    keys = torch.arange(p + T, device=cache.valid.device)
    queries = torch.arange(p, p + T, device=cache.valid.device)
    causal = keys[None, :] <= queries[:, None]
    mask = causal[None] & cache.valid[:, None, :p + T]
    mask |= keys[None, None, :] == queries[None, :, None]
    return mask.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_head, self.cfg.n_kv_head
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            p = cache.pos
            cache.k[self.layer_idx, :, :, p:p + T] = k
            cache.v[self.layer_idx, :, :, p:p + T] = v
            k = cache.k[self.layer_idx, :, :, :p + T]
            v = cache.v[self.layer_idx, :, :, :p + T]
        gqa = nkv != nh
        if mask is None:  # full causal sequence (training, or a prefill from position 0)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif mask is NO_MASK:  # one new token that may see the whole cache
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE tables cover 4x the training context so generation can run past it (quality may degrade);
        # an imported model's long context starts smaller and the tables grow when a position needs it.
        cos, sin = rope_tables(cfg.head_dim, min(4 * cfg.seq_len, max(cfg.seq_len, 16384)), cfg.rope_theta,
                               cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _ensure_rope(self, n_positions: int) -> None:
        if n_positions > self.rope_cos.shape[0]:
            c = self.config
            cos, sin = rope_tables(c.head_dim, max(n_positions, 2 * self.rope_cos.shape[0]), c.rope_theta,
                                   c.rope_scaling)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Residual-branch outputs start at zero (each block starts as the identity), inputs are scaled by
        1/sqrt(fan_in), and the head starts tiny so the first predictions are near-uniform."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.001)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))

    # ---- bookkeeping ------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight multiply-accumulate (forward + backward) plus attention."""
        T = seq_len or self.config.seq_len
        c = self.config
        n_matmul = self.num_params() - self.embed_tokens.weight.numel() * (0 if c.tie_embeddings else 1)
        attn = 12 * c.n_layer * c.n_head * c.head_dim * T / 2  # causal: half the scores
        return 6 * n_matmul + attn

    # ---- forward ----------------------------------------------------------------------------------
    def hidden_states(self, idx, *, position_ids=None, attn_mask=None, kv_cache: KVCache | None = None,
                      new_valid=None):
        """Final normed hidden states (B, T, C); the reward and value heads read these.

        With a KV cache the mask is built from the cache (`new_valid` (B, T) marks left padding in a prefill)."""
        B, T = idx.shape
        if kv_cache is not None and attn_mask is None:
            if kv_cache.pos + T > kv_cache.max_len:
                raise ValueError(f"KV cache overflow: {kv_cache.pos} + {T} > {kv_cache.max_len}")
            attn_mask = cache_attention_mask(kv_cache, T, new_valid)
        start = kv_cache.pos if kv_cache is not None else 0
        self._ensure_rope(start + T)   # given position_ids (packed rows) never exceed this either
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)
        cos = self.rope_cos[position_ids].unsqueeze(1).to(self.embed_tokens.weight.dtype)
        sin = self.rope_sin[position_ids].unsqueeze(1).to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(idx)
        if x.dtype != cos.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)

    def forward(self, idx, targets=None, *, position_ids=None, attn_mask=None, kv_cache=None,
                new_valid=None, reduction: str = "mean", last_only: bool = False):
        """Logits (B, T, V) when `targets` is None, else the cross-entropy (targets == -1 are ignored):
        a scalar mean for reduction='mean', per-token (B, T) for 'none', a sum for 'sum'."""
        h = self.hidden_states(idx, position_ids=position_ids, attn_mask=attn_mask, kv_cache=kv_cache,
                               new_valid=new_valid)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss


# ---- the depth dial (config.py documents it) ---------------------------------------------------------------

def model_config_from_depth(depth: int, vocab_size: int, seq_len: int, n_embd: int | None = None,
                            n_kv_head: int | None = None, **overrides) -> GPTConfig:
    """The dial's model; `n_embd` overrides the width (heads and MLP follow the width), `n_kv_head` turns on
    grouped-query attention, other GPTConfig fields override directly."""
    if depth < 1:
        raise ConfigError(f"--depth must be at least 1, got {depth}")
    n_embd = n_embd or 64 * depth
    if n_embd < 64 or n_embd % 64:
        raise ConfigError(f"--n-embd must be a positive multiple of 64, got {n_embd}")
    head_dim = 64 if n_embd < 1024 else 128
    n_head = max(1, n_embd // head_dim)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head or n_head,
                    mlp_hidden=64 * math.ceil(8 * n_embd / 3 / 64), seq_len=seq_len)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head:
        raise ConfigError(f"n_embd {cfg.n_embd} must divide into n_head {cfg.n_head} heads, "
                          f"and n_head into n_kv_head {cfg.n_kv_head} groups")
    return cfg


# ---- Hugging Face parameter names: ours are LlamaForCausalLM's without the inner `model.` -------------------

def hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours


def our_name(hf: str) -> str:
    return hf[len("model."):] if hf.startswith("model.") else hf


# ---- getting at the GPT inside wrappers, and loading its weights -------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers: what a checkpoint saves (PEFT and heads are kept)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def core_gpt(model: nn.Module) -> GPT:
    """The GPT inside PEFT / DDP / torch.compile / reward- and value-head wrappers."""
    m = model
    for _ in range(10):
        if isinstance(m, GPT):
            return m
        nxt = None
        for attr in ("_orig_mod", "module", "body", "policy", "base_model", "model"):
            sub = m.__dict__.get("_modules", {}).get(attr)
            if isinstance(sub, nn.Module):
                nxt = sub
                break
        if nxt is None:
            break
        m = nxt
    raise TypeError(f"no gptstack GPT inside {type(model).__name__}")


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a saved state dict exactly. Tied embeddings are stored once (safetensors refuses shared storage),
    so a missing lm_head.weight is the embedding's; any other mismatch is a one-line CheckpointError."""
    if "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {where} do not fit this model ({str(e).splitlines()[0]})") from None
