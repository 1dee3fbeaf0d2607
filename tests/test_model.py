import torch

from gptstack.model.gpt import GPT, KVCache


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = GPT(cfg)
    m.init_weights(seed)
    # zero-initialised output projections make every block the identity; perturb them so tests see attention
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.05)
    return m.eval()


def test_causality(tiny_config):
    m = _model(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 24))
    base = m(x)
    for t in (0, 5, 23):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % tiny_config.vocab_size
        out = m(y)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5), f"changing token {t} changed earlier logits"
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-5)


def test_kv_cache_matches_full_forward(tiny_config):
    m = _model(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (3, 30))
    full = m(x)
    cache = KVCache(tiny_config, 3, 40, "cpu", torch.float32)
    parts = [m(x[:, :11], kv_cache=cache)] + [m(x[:, t:t + 1], kv_cache=cache) for t in range(11, 20)]
    parts.append(m(x[:, 20:], kv_cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padding_with_positions_matches_unpadded(tiny_config):
    m = _model(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (1, 12))
    ref = m(x)[:, -1]
    pad = 5
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
    valid = torch.tensor([[False] * pad + [True] * 12])
    pos = (torch.arange(17) - pad).clamp(min=0)[None]
    cache = KVCache(tiny_config, 1, 32, "cpu", torch.float32)
    out = m(ids, kv_cache=cache, position_ids=pos, new_valid=valid)[:, -1]
    assert torch.allclose(out, ref, atol=1e-5)


def test_gqa_and_tied_embeddings_shapes(tiny_config):
    from dataclasses import replace

    cfg = replace(tiny_config, n_kv_head=1, tie_embeddings=True, qk_norm=False)
    m = _model(cfg)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert m.layers[0].self_attn.k_proj.weight.shape == (cfg.head_dim, cfg.n_embd)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    assert m(x).shape == (2, 9, cfg.vocab_size)


def test_loss_matches_hand_computed_cross_entropy(tiny_config):
    m = _model(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 8))
    y = torch.randint(0, tiny_config.vocab_size, (2, 8))
    y[0, :3] = -1
    logits = m(x)
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[b, t, y[b, t]] for b in range(2) for t in range(8) if y[b, t] >= 0]
    assert torch.allclose(m(x, y), torch.stack(picked).mean(), atol=1e-5)
    per_tok = m(x, y, reduction="none")
    assert per_tok.shape == (2, 8) and (per_tok[0, :3] == 0).all()


def test_param_count_and_flops(tiny_config):
    m = GPT(tiny_config)
    c = tiny_config
    per_layer = (c.n_embd * c.n_head * c.head_dim * 2 + c.n_embd * c.n_kv_head * c.head_dim * 2
                 + 3 * c.n_embd * c.mlp_hidden + 2 * c.n_embd + 2 * c.head_dim)
    expected = 2 * c.vocab_size * c.n_embd + c.n_layer * per_layer + c.n_embd
    assert m.num_params() == expected
    assert m.flops_per_token() > 6 * (expected - c.vocab_size * c.n_embd)


def test_depth_dial():
    from gptstack.model.gpt import model_config_from_depth

    c = model_config_from_depth(12, 32768, 2048)
    assert (c.n_embd, c.n_head, c.head_dim, c.mlp_hidden) == (768, 12, 64, 2048)
    c = model_config_from_depth(20, 32768, 2048)
    assert (c.n_embd, c.head_dim, c.n_head) == (1280, 128, 10)


def test_width_override_keeps_heads_consistent():
    import pytest

    from gptstack.model.gpt import model_config_from_depth
    from gptstack.errors import ConfigError

    c = model_config_from_depth(2, 320, 64, n_embd=128, n_kv_head=1)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.mlp_hidden) == (128, 2, 1, 384)
    with pytest.raises(ConfigError):
        model_config_from_depth(2, 320, 64, n_embd=100)
