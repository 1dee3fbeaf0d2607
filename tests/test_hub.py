"""Importing Hugging Face models: for every supported architecture, a random-init model saved by transformers
gives the same logits, the same greedy tokens and the same chat rendering here as in transformers."""

import json
import shutil

import pytest
import torch

from _hf_models import VARIANTS, build

pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "6, I think."},
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build(name, root / name) for name in VARIANTS}


def _ids(x):
    return list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "input_ids") else x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_matches_transformers(hf_dirs, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptstack.infer.engine import Engine
    from gptstack.infer.sampling import SamplingParams
    from gptstack.runs import load_model

    d = hf_dirs[name]
    model, tok, config = load_model(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, tok.n_tokens, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: logits differ by {diff}"

    prompt = tok.render_prompt(CONVERSATION[:4])
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    ours = Engine(model, tok).generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[]))
    assert ours[0][0].tokens == ref

    htok = AutoTokenizer.from_pretrained(d)
    ids_full, mask = tok.render_conversation(CONVERSATION)
    assert ids_full == _ids(htok.apply_chat_template(CONVERSATION, tokenize=True))
    assert prompt == _ids(htok.apply_chat_template(CONVERSATION[:4], tokenize=True, add_generation_prompt=True))
    # the mask covers exactly each reply and the token that closes its turn
    spans, cur = [], []
    for i, m in zip(ids_full, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    end = tok.decode([tok.assistant_end_id])
    assert [s.strip() for s in spans] == [f"It is 4.{end}", f"6, I think.{end}"]
    assert end in (config["hf"]["model_type"] and {"<|eot_id|>", "<|im_end|>", "</s>"})


def test_features_are_imported(hf_dirs):
    from gptstack.runs import read_config

    cfgs = {n: read_config(d)["model"] for n, d in hf_dirs.items()}
    assert cfgs["llama3"]["rope_scaling"]["rope_type"] == "llama3" and cfgs["llama3"]["n_kv_head"] == 2
    assert cfgs["smollm2"]["tie_embeddings"] and cfgs["smollm2"]["n_kv_head"] == 1
    assert cfgs["qwen2"]["qkv_bias"] and not cfgs["qwen2"]["o_bias"]
    assert cfgs["qwen3"]["qk_norm"] and cfgs["qwen3"]["attn_head_dim"] == 32
    assert cfgs["mistral"]["seq_len"] == 128   # capped at the sliding window, noted
    assert "sliding window" in read_config(hf_dirs["mistral"])["hf"]["notes"][0]
    assert (hf_dirs["qwen3"] / "model.safetensors.index.json").exists()


def _broken(hf_dirs, tmp_path, name="llama3"):
    d = tmp_path / "broken"
    shutil.copytree(hf_dirs[name], d)
    return d


@pytest.mark.parametrize("breakage, message", [
    ("no-config", "no config.json"),
    ("no-weights", "no model.safetensors"),
    ("unknown-arch", "architecture 'GPT2LMHeadModel'"),
    ("rope-yarn", "RoPE scaling 'yarn' is not supported"),
    ("small-embedding", "do not belong together"),
    ("missing-tensor", "do not fit this model"),
    ("truncated", "corrupt or truncated"),
    ("missing-shard", "missing shard"),
])
def test_bad_models_are_one_line_errors(hf_dirs, tmp_path, breakage, message):
    from gptstack.errors import CheckpointError
    from gptstack.runs import load_model

    d = _broken(hf_dirs, tmp_path, "qwen3" if breakage == "missing-shard" else "llama3")
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if breakage == "no-config":
        cfg_path.unlink()
    elif breakage == "no-weights":
        (d / "model.safetensors").unlink()
    elif breakage == "unknown-arch":
        cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    elif breakage == "rope-yarn":
        cfg_path.write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                   "rope_theta": 10000.0}}))
    elif breakage == "small-embedding":
        cfg_path.write_text(json.dumps({**cfg, "vocab_size": 100}))
    elif breakage == "missing-tensor":
        from safetensors.torch import load_file, save_file

        state = load_file(d / "model.safetensors")
        state.pop("model.layers.1.mlp.up_proj.weight")
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    elif breakage == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "missing-shard":
        next(p for p in sorted(d.glob("model-*.safetensors"))).unlink()
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(d)
    assert "\n" not in str(e.value)


def test_a_hub_id_loads_from_the_local_hub_cache(hf_dirs, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's snapshot_download; offline, with the model in the cache (laid out
    as the hub client lays it out), it loads without network; an id that is not cached is a one-line error."""
    from gptstack.errors import CheckpointError
    from gptstack.runs import load_model, read_config

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llama"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(hf_dirs["llama3"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model, tok, cfg = load_model("someone/tiny-llama")
    assert cfg["hf"]["model_type"] == "llama" and tok.assistant_end_id == tok.special_ids["<|eot_id|>"]
    with pytest.raises(CheckpointError, match="neither a local directory nor a downloadable hub model"):
        read_config("someone/not-cached")
