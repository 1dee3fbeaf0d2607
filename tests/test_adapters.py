"""LoRA / QLoRA through PEFT: save/load round trip in PEFT's own format, merge equality, bad targets, 4-bit."""

import json
from pathlib import Path

import pytest
import torch

from gptstack.errors import ConfigError, DependencyError
from gptstack.model import adapters as A
from gptstack.runs import merge_run
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.io import atomic_write_json, save_weights
from gptstack.runs import load_model

CFG = GPTConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, mlp_hidden=128, seq_len=64)


def base_model() -> GPT:
    m = GPT(CFG)
    m.init_weights(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


X = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_apply_lora_trains_only_the_factors_of_the_named_modules():
    model = A.apply_lora(base_model(), rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * CFG.n_layer
    assert not any("lm_head" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        assert torch.equal(model(X), base_model()(X))


def test_lm_head_only_when_listed():
    model = A.apply_lora(base_model(), rank=4, targets="q_proj,lm_head")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.lora_A" in n for n in names) and not any("v_proj" in n for n in names)


def test_bad_target_names_it():
    with pytest.raises(ConfigError, match="'wq' matches no"):
        A.apply_lora(base_model(), targets="q_proj,wq")
    with pytest.raises(ConfigError, match="empty"):
        A.apply_lora(base_model(), targets=" , ")


def test_optimizer_puts_lora_factors_in_adamw_at_lr():
    from gptstack.config import TrainConfig
    from gptstack.train.optim import build_optimizers

    model = A.apply_lora(base_model(), rank=4)
    opts = build_optimizers(model, TrainConfig(optimizer="muon", lr=1.5e-3), 64)
    assert [type(o).__name__ for o in opts] == ["AdamW"]
    groups = opts[0].param_groups
    assert len(groups) == 1 and groups[0]["lr"] == 1.5e-3
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_peft_save_load_round_trip_and_merge(tmp_path):
    import peft

    model = A.apply_lora(base_model(), rank=4, alpha=8)
    randomize_lora(model)
    model.eval()
    with torch.no_grad():
        ref = model(X)
    A.save_adapter(model, tmp_path / "adapter", checkpoint_id="abc")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # PEFT's own loader reads our files onto the same base as a transformers model (the names on disk are
    # the HF model's, so the adapter fits an exported or imported base)
    import transformers

    from gptstack.export.hf import hf_state
    from gptstack.hub.convert import hf_config_from_gpt

    hf_cfg = hf_config_from_gpt(base_model().config, None, None)
    hf_model = getattr(transformers, hf_cfg["architectures"][0])(
        getattr(transformers, hf_cfg["architectures"][0].replace("ForCausalLM", "Config"))(**hf_cfg))
    hf_model.load_state_dict(hf_state(base_model()), strict=False)
    theirs = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    ours = A.load_adapter(base_model(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(theirs(X).logits, ref, atol=1e-5)
        assert torch.allclose(ours(X), ref, atol=1e-6)
    merged = A.merge_adapter(ours)
    assert type(merged) is GPT and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(X), ref, atol=1e-5)
        assert not torch.allclose(base_model()(X), ref, atol=1e-3)  # the adapter did change the model


def make_adapter_run(tmp_path: Path, qlora: bool) -> Path:
    """A base run and an adapter-only run on top of it, as `gptstack sft --lora` writes them."""
    from gptstack.tokenizer import Tokenizer

    from gptstack.data.tasks import generate_mixture

    tok = Tokenizer.train([m["content"] for e in generate_mixture("all", "train", 30, 0) for m in e.messages] * 3,
                          vocab_size=300)
    assert tok.vocab_size == CFG.vocab_size
    base = tmp_path / "base"
    model = base_model()
    base.mkdir()
    save_weights(base / "model.safetensors", model.state_dict(), {"checkpoint_id": "b"})
    tok.save(base / "tokenizer")
    atomic_write_json(base / "config.json", {"kind": "lm", "stage": "pretrain", "model": CFG.to_dict()})
    run = tmp_path / "lora"
    run.mkdir()
    m = base_model()
    if qlora:
        A.quantize_4bit(m)
    peft_model = A.apply_lora(m, rank=4, alpha=8)
    randomize_lora(peft_model)
    A.save_adapter(peft_model, run / "adapter", "c1")
    tok.save(run / "tokenizer")
    atomic_write_json(run / "config.json", {"kind": "lm", "stage": "sft", "model": CFG.to_dict(),
                                            "parent_run": str(base), "adapter": {"lora": True, "qlora": qlora}})
    return run


@pytest.mark.parametrize("qlora", [False, True])
def test_merge_run_gives_the_same_logits(tmp_path, qlora):
    run = make_adapter_run(tmp_path, qlora)
    unmerged, _, _ = load_model(run)
    assert hasattr(unmerged, "peft_config")
    merge_run(run, tmp_path / "merged")
    merged, _, config = load_model(tmp_path / "merged")
    assert type(merged) is GPT and config["merged_from"] == str(run.resolve())
    with torch.no_grad():
        assert torch.allclose(unmerged(X), merged(X), atol=1e-5)
    with pytest.raises(ConfigError, match="already holds a run"):
        merge_run(run, tmp_path / "merged")


def test_qlora_4bit_forward_backward_and_memory():
    model = base_model()
    full = A.model_memory(model)
    try:
        A.quantize_4bit(model)
    except DependencyError as e:  # a machine whose bitsandbytes cannot run 4-bit: the error says what to do
        assert "bitsandbytes" in str(e)
        pytest.skip(str(e))
    import bitsandbytes as bnb

    assert isinstance(model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in full precision
    peft_model = A.apply_lora(model, rank=4)
    with torch.no_grad():  # nf4 is close to, not equal to, the fp32 model
        err = (peft_model(X) - base_model()(X)).abs().max()
        assert 0 < err < 0.05
    loss = peft_model(X, X)
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    quant = A.model_memory(peft_model)
    linear_params = sum(p.numel() for n, p in base_model().named_parameters() if "layers." in n and p.ndim == 2)
    # each quantized weight takes half a byte (plus block statistics) instead of four
    assert full["weights"] - quant["weights"] > 0.8 * linear_params * 3.5


def test_qlora_dependency_error_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kw):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(DependencyError, match="QLoRA needs bitsandbytes"):
        A.quantize_4bit(base_model())
