"""The Hugging Face reference the benches compare against: our GPT's weights in the equivalent transformers
model (Llama layout, or Qwen3's when the GPT has QK-norm: the same RMSNorm on each head before RoPE), a check
that both give the same logits, and a model directory `transformers serve` can load (weights, config,
generation config, and our tokenizer as an HF fast tokenizer with our chat format as its chat template).

    ours, hf = make_models(cfg)                 # random N(0, 0.02) weights, copied 1:1
    check_same_logits(ours, hf, prompts)
    save_hf_dir(hf, tokenizer, "out/hf")        # for `transformers serve out/hf`
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptstack.model.gpt import GPT, GPTConfig


def make_models(cfg: GPTConfig, seed: int = 0, ours: GPT | None = None):
    """Our GPT (random N(0, 0.02) weights unless given) and an HF model with the same weights: Llama, or Qwen3
    when the GPT has QK-norm."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if ours is None:
        torch.manual_seed(seed)
        ours = GPT(cfg)
        with torch.no_grad():
            for p in ours.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
    ours.eval()
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_kv_head, max_position_embeddings=4 * cfg.seq_len,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False)
    if cfg.qk_norm:
        hf = Qwen3ForCausalLM(Qwen3Config(head_dim=cfg.head_dim, use_sliding_window=False, **common)).eval()
    else:
        hf = LlamaForCausalLM(LlamaConfig(mlp_bias=False, **common)).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
             for k, v in ours.state_dict().items() if not k.startswith("rope_")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ours, hf


def check_same_logits(ours, hf, prompts: torch.Tensor) -> None:
    with torch.no_grad():
        a = ours(prompts)[:, -1]
        b = hf(prompts).logits[:, -1]
    assert torch.allclose(a, b, atol=1e-4), f"weights did not copy: max diff {(a - b).abs().max()}"


# Jinja for Tokenizer.render_prompt: <|bos|>, then <|role_start|> content <|role_end|> per message, then
# <|assistant_start|> (the specials are added tokens, so the HF tokenizer encodes them as single ids)
CHAT_TEMPLATE = ("<|bos|>{% for m in messages %}<|{{ m['role'] }}_start|>{{ m['content'] }}<|{{ m['role'] }}_end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant_start|>{% endif %}")


def save_hf_dir(hf, tokenizer, out: str | Path) -> Path:
    """`hf` and our `tokenizer` saved as an HF model directory; checks that its chat template gives the same
    prompt ids as our renderer."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_file = out / "_tokenizer.json"
    tok_file.write_text(json.dumps(tokenizer.to_hf_json(), ensure_ascii=False))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                   pad_token="<|bos|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    tok_file.unlink()
    hf.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.assistant_end_id,
                                            pad_token_id=tokenizer.bos_id)
    hf.save_pretrained(out)
    messages = [{"role": "user", "content": "Speak, good lord: what of the crown?"}]
    ids = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer.render_prompt(messages), "the HF chat template does not match our renderer"
    return out
