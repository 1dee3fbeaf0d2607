"""GGUF export: a tiny run written as f32 / f16 / q8_0 and read back with gguf's own reader.

Every tensor equals ours (f32; f16 to f16 rounding) or lies within q8_0's rounding (half a step of its block's
scale); the llama architecture's q/k permutation is undone to compare, and shown to turn our rotate-half RoPE
into llama.cpp's adjacent-pair RoPE; the hyperparameters and tokenizer keys are there, and the stored tokens +
merges, rebuilt into a `tokenizers` BPE with our split, encode held-out text to our ids. A LoRA run exports
its merged weights. Where llama.cpp's binaries are at hand (GPTSTACK_LLAMA_CPP=DIR holding llama-tokenize and
llama-simple, or on PATH), llama.cpp itself tokenizes held-out text to our ids and greedy-decodes our tokens
(f32), and with llama-completion there too, renders the stored chat template into our prompt ids.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from _infer_util import save_run, tiny_model  # noqa: E402
from gptstack.errors import CheckpointError, ConfigError  # noqa: E402
from gptstack.export.gguf import export_gguf, gguf_name, permute_rope, unpermute_rope  # noqa: E402
from gptstack.model.gpt import GPT, GPTConfig, apply_rope, rope_inv_freq  # noqa: E402
from gptstack.runs import load_model  # noqa: E402

HELD_OUT = ("Thou art not the king's 2024 crown; she'll SPEAK 'TIS true, we've 3.14159!\n\n"
            "  \tunseen wörds, héllo 日本語 😀 x1y22z333 -- 'RE 'Ll\r\n  end  ")


def field(reader, key):
    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def tensors(reader) -> dict:
    """name -> (type, float32 array in our (rows, cols) layout)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))   # GGUF lists dims innermost first
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 \
            else np.asarray(t.data, dtype=np.float32)
        out[t.name] = (t.tensor_type, np.array(data).reshape(shape))
    return out


def expected(model: GPT, arch: str) -> dict:
    """Our tensors under GGUF names, permuted as llama.cpp's llama architecture wants q/k."""
    cfg = model.config
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    out = {}
    for k, a in state.items():
        if arch == "llama" and ".q_proj." in k:
            a = permute_rope(a, cfg.n_head)
        elif arch == "llama" and ".k_proj." in k:
            a = permute_rope(a, cfg.n_kv_head)
        out[gguf_name(k)] = a
    return out


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_tokenizer():
    """A 2048-token vocabulary trained on the README and the package's top-level modules: merges across
    words, spaces, punctuation and indentation, so a split that differs from ours would show."""
    from gptstack.tokenizer import Tokenizer

    text = (REPO / "README.md").read_text() + "".join(p.read_text() for p in sorted((REPO / "src/gptstack").glob("*.py")))
    return Tokenizer.train([text], vocab_size=2048)


def held_out_text() -> str:
    """Text the big tokenizer never saw: the tokenizer tests' source and the mixed-script sample."""
    return (REPO / "tests" / "test_tokenizer.py").read_text() + HELD_OUT


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory, tiny_tokenizer):
    """Our default layout: q/k norm (-> qwen3), grouped-query attention."""
    d = tmp_path_factory.mktemp("gguf_qwen3")
    return save_run(d / "run", tiny_model(tiny_tokenizer, n_head=4, n_kv_head=2), tiny_tokenizer)


def llama_model(tokenizer, **extra) -> GPT:
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=128,
                    seq_len=64, qk_norm=False, **extra)
    torch.manual_seed(1)
    m = GPT(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 or n.endswith(".bias"):
                p.normal_(0, 0.3)
            else:
                p.uniform_(0.5, 1.5)   # norms
    return m.eval()


@pytest.mark.parametrize("tensor_type", ["f32", "f16", "q8_0"])
def test_qwen3_tensors_and_metadata_read_back(tmp_path, qwen3_run, tiny_tokenizer, tensor_type):
    out = export_gguf(qwen3_run, tmp_path / "m.gguf", tensor_type)
    assert out == tmp_path / "m.gguf" and not list(tmp_path.glob("*.tmp"))
    r = gguf.GGUFReader(out)
    model, _, _ = load_model(qwen3_run)
    cfg = model.config
    assert field(r, "general.architecture") == "qwen3"
    assert field(r, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[tensor_type]
    for key, value in [("context_length", cfg.seq_len), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 128), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("attention.key_length", 16),
                       ("attention.value_length", 16), ("rope.dimension_count", 16)]:
        assert field(r, f"qwen3.{key}") == value, key
    assert field(r, "qwen3.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)

    got, want = tensors(r), expected(model, "qwen3")
    assert set(got) == set(want) and "blk.1.attn_q_norm.weight" in got and "output.weight" in got
    for name, a in want.items():
        kind, b = got[name]
        assert b.shape == a.shape, name
        if a.ndim == 1 or tensor_type == "f32":   # norms stay f32 in every file
            assert kind == gguf.GGMLQuantizationType.F32 and np.array_equal(a, b), name
        elif tensor_type == "f16":
            assert kind == gguf.GGMLQuantizationType.F16 and np.array_equal(a.astype(np.float16), b), name
        else:   # q8_0: 32-wide blocks of int8 codes times an f16 scale d = amax/127: half a step of rounding,
            # plus up to 127 codes times the scale's own f16 rounding (2^-11 relative)
            assert kind == gguf.GGMLQuantizationType.Q8_0, name
            blocks = a.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(blocks - b.reshape(-1, 32))
            assert (err <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all(), name
            assert err.max() <= 0.01 * np.abs(a).max()
            assert err.max() > 0   # it really is quantized

    # the tokenizer keys
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "bailingmoe"
    toks, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(toks) == len(types) == cfg.vocab_size
    for name, i in tiny_tokenizer.special_ids.items():
        assert toks[i] == name and types[i] == gguf.TokenType.CONTROL
    assert all(t == gguf.TokenType.NORMAL for t in types[:len(tiny_tokenizer.mergeable_ranks)])
    assert field(r, "tokenizer.ggml.bos_token_id") == tiny_tokenizer.bos_id
    assert field(r, "tokenizer.ggml.eos_token_id") == tiny_tokenizer.assistant_end_id
    assert field(r, "tokenizer.ggml.eot_token_id") == tiny_tokenizer.assistant_end_id
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    template = field(r, "tokenizer.chat_template")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 12"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}]
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = ImmutableSandboxedEnvironment().from_string(template).render(
        messages=conv, add_generation_prompt=True, bos_token="<|bos|>")
    assert text == tiny_tokenizer.decode(tiny_tokenizer.render_prompt(conv))


def test_stored_vocabulary_encodes_held_out_text_as_we_do(tmp_path, big_tokenizer):
    """Decode the stored vocabulary: GGUF tokens + merges -> a `tokenizers` byte-level BPE with our split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from gptstack.tokenizer import SPLIT_PATTERN

    tok = big_tokenizer
    run = save_run(tmp_path / "run", tiny_model(tok), tok)
    r = gguf.GGUFReader(export_gguf(run, tmp_path / "m.gguf", "f16"))
    toks, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field(r, "tokenizer.ggml.merges")]
    assert len(merges) == len(tok.mergeable_ranks) - 256
    vocab = {t: i for i, (t, k) in enumerate(zip(toks, types)) if k == gguf.TokenType.NORMAL}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    text = held_out_text()
    ours = tok.encode(text)
    assert bpe.encode(text).ids == ours and len(ours) > 1000
    assert bpe.decode(ours) == text


def test_llama_arch_permutes_q_k_for_adjacent_pair_rope(tmp_path, tiny_tokenizer):
    """Without q/k norm: the llama architecture, GQA, q/k/v and o biases, a tied head, Llama 3 RoPE scaling."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = llama_model(tiny_tokenizer, qkv_bias=True, o_bias=True, tie_embeddings=True, rope_scaling=scaling)
    run = save_run(tmp_path / "run", model, tiny_tokenizer)
    r = gguf.GGUFReader(export_gguf(run, tmp_path / "m.gguf", "f32"))
    assert field(r, "general.architecture") == "llama"
    got, want = tensors(r), expected(model, "llama")
    assert set(got) - set(want) == {"rope_freqs.weight"} and set(want) <= set(got)
    assert "output.weight" not in got and "blk.0.attn_output.bias" in got   # tied: llama.cpp reuses token_embd
    for name, a in want.items():
        assert np.array_equal(got[name][1], a), name
    # undoing the permutation gives back exactly our weights
    q = model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k_b = model.layers[1].self_attn.k_proj.bias.detach().numpy()
    assert np.array_equal(unpermute_rope(got["blk.0.attn_q.weight"][1], 4), q)
    assert np.array_equal(unpermute_rope(got["blk.1.attn_k.bias"][1], 2), k_b)
    # llama.cpp divides frequency i by rope_freqs[i]: that gives our Llama 3 frequencies
    base = rope_inv_freq(16, model.config.rope_theta)
    assert torch.allclose(base / torch.from_numpy(got["rope_freqs.weight"][1]),
                          rope_inv_freq(16, model.config.rope_theta, scaling))

    # the permuted projection under adjacent-pair RoPE (llama.cpp's "normal" mode) is our rotate-half RoPE,
    # rows permuted: so every attention score is unchanged
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)
    inv = rope_inv_freq(16, model.config.rope_theta, scaling)
    ang = pos[:, None].float() * inv[None]
    cos, sin = ang.cos(), ang.sin()
    ours = apply_rope((x @ torch.from_numpy(q).T).view(5, 4, 16).transpose(0, 1)[None], cos[None, None],
                      sin[None, None])[0]   # (heads, T, 16)
    qp = (x @ torch.from_numpy(got["blk.0.attn_q.weight"][1]).T).view(5, 4, 8, 2)
    x0, x1 = qp[..., 0], qp[..., 1]
    theirs = torch.stack([x0 * cos[:, None] - x1 * sin[:, None], x0 * sin[:, None] + x1 * cos[:, None]], -1)
    theirs = theirs.reshape(5, 4, 16).transpose(0, 1)
    back = torch.from_numpy(unpermute_rope(theirs.transpose(0, 1).reshape(5, 64).T.numpy(), 4).T.copy())
    assert torch.allclose(back.view(5, 4, 16).transpose(0, 1), ours, atol=1e-5)


def test_q8_0_keeps_rows_that_do_not_split_into_blocks_f16(tmp_path, tiny_tokenizer):
    cfg = GPTConfig(vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_embd=64, n_head=4, n_kv_head=2,
                    mlp_hidden=80, seq_len=32)   # ffn_down's rows are 80 wide: not a multiple of 32
    model = GPT(cfg)
    model.init_weights(0)
    r = gguf.GGUFReader(export_gguf(save_run(tmp_path / "run", model, tiny_tokenizer), tmp_path / "m.gguf", "q8_0"))
    got = tensors(r)
    assert got["blk.0.ffn_down.weight"][0] == gguf.GGMLQuantizationType.F16
    assert got["blk.0.ffn_up.weight"][0] == gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(got["blk.0.ffn_up.weight"][1].shape, (80, 64))


@pytest.mark.slow   # importing peft takes ~10 s of CPU
def test_lora_run_exports_its_merged_weights(tmp_path, tiny_tokenizer):
    pytest.importorskip("peft")
    from gptstack.io import atomic_write_json
    from gptstack.model import adapters as A

    base = save_run(tmp_path / "base", tiny_model(tiny_tokenizer, n_head=4), tiny_tokenizer)
    peft_model = A.apply_lora(tiny_model(tiny_tokenizer, n_head=4), rank=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    run = tmp_path / "lora"
    A.save_adapter(peft_model, run / "adapter", "c1")
    tiny_tokenizer.save(run / "tokenizer")
    atomic_write_json(run / "config.json", {"kind": "lm", "stage": "sft", "model": load_model(base)[2]["model"],
                                            "parent_run": base, "adapter": {"rank": 4, "alpha": 8.0}})
    merged = A.merge_adapter(load_model(run)[0])
    r = gguf.GGUFReader(export_gguf(run, tmp_path / "m.gguf", "f32"))
    got = tensors(r)
    for name, a in expected(merged, "qwen3").items():
        assert np.array_equal(got[name][1], a), name
    base_q = load_model(base)[0].layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.allclose(got["blk.0.attn_q.weight"][1], base_q, atol=1e-3)   # the adapter is in


def test_bad_type_missing_run_and_unsupported_models(tmp_path, qwen3_run, tiny_tokenizer):
    with pytest.raises(ConfigError, match="unknown --type 'q4_k'"):
        export_gguf(qwen3_run, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf", "f16")
    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(qwen3_run, tmp_path, "f16")
    m = tiny_model(tiny_tokenizer)
    m.config.o_bias = True   # q/k norm + an output bias: llama.cpp's qwen3 has no such tensor
    run = save_run(tmp_path / "obias", GPT(m.config), tiny_tokenizer)
    with pytest.raises(ConfigError, match="output bias"):
        export_gguf(run, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob("*.tmp"))
    # an existing file is replaced whole
    (tmp_path / "old.gguf").write_bytes(b"old")
    export_gguf(qwen3_run, tmp_path / "old.gguf", "q8_0")
    assert gguf.GGUFReader(tmp_path / "old.gguf").tensors


# ---- llama.cpp itself, where its binaries are at hand -----------------------------------------------------

def llama_cpp_bin(name: str) -> str | None:
    d = os.environ.get("GPTSTACK_LLAMA_CPP")
    path = Path(d) / name if d else None
    return str(path) if path and path.exists() else shutil.which(name)


@pytest.mark.skipif(not (llama_cpp_bin("llama-tokenize") and llama_cpp_bin("llama-simple")),
                    reason="llama.cpp binaries not found (set GPTSTACK_LLAMA_CPP=DIR with llama-tokenize, "
                           "llama-simple)")
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_llama_cpp_tokenizes_and_greedy_decodes_as_we_do(tmp_path, tiny_tokenizer, big_tokenizer, arch):
    import json

    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(llama_cpp_bin("llama-simple")).parent)}
    # llama.cpp's own tokenizer on the stored vocabulary (the big one: many merges) gives our ids
    big = str(export_gguf(save_run(tmp_path / "big", tiny_model(big_tokenizer), big_tokenizer), tmp_path / "b.gguf"))
    (tmp_path / "held.txt").write_text(held_out_text(), encoding="utf-8")
    ids = subprocess.run([llama_cpp_bin("llama-tokenize"), "-m", big, "-f", str(tmp_path / "held.txt"), "--ids",
                          "--no-bos", "--no-escape", "--no-parse-special", "--log-disable"],
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(ids.stdout.strip().splitlines()[-1]) == big_tokenizer.encode(held_out_text())

    if arch == "qwen3":
        model = tiny_model(tiny_tokenizer, n_head=4, n_kv_head=2)
    else:
        model = llama_model(tiny_tokenizer, qkv_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.3)
    run = save_run(tmp_path / "run", model, tiny_tokenizer)
    path = str(export_gguf(run, tmp_path / "m.gguf", "f32"))

    prompt = "The king"
    x = torch.tensor([tiny_tokenizer.encode(prompt, bos=True)])
    gen = []
    with torch.no_grad():
        for _ in range(32):
            nxt = int(model(x)[0, -1].argmax())
            if nxt == tiny_tokenizer.assistant_end_id:   # llama.cpp stops at the end-of-turn token
                break
            gen.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    out = subprocess.run([llama_cpp_bin("llama-simple"), "-m", path, "-n", "32", prompt], capture_output=True,
                         env=env, check=True).stdout
    assert out.rstrip(b"\n") == b"<|bos|>" + prompt.encode() + tiny_tokenizer.decode_bytes(gen)

    if llama_cpp_bin("llama-completion") and arch == "qwen3":
        # llama.cpp's Jinja engine renders the stored chat template into exactly our prompt ids
        import re

        run_chat = subprocess.run([llama_cpp_bin("llama-completion"), "-m", path, "--jinja", "-cnv", "-st",
                                   "-sys", "Be brief.", "-p", "Hi 12", "-n", "1", "--temp", "0", "--verbose-prompt"],
                                  capture_output=True, env=env, stdin=subprocess.DEVNULL, check=True, timeout=120)
        log = (run_chat.stdout + run_chat.stderr).decode(errors="replace")
        listed = log.split("number of tokens in prompt", 1)[1].split("sampler", 1)[0]
        ids = [int(m) for m in re.findall(r" I +(\d+) -> ", listed)]
        assert ids == tiny_tokenizer.render_prompt([{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi 12"}])


# ---- an imported Hugging Face model goes out too --------------------------------------------------------

@pytest.mark.slow   # transformers builds the models
@pytest.mark.parametrize("variant,arch,pre", [("qwen3", "qwen3", "qwen2"), ("smollm2", "llama", "gpt-2"),
                                               ("llama3", "llama", "gpt-2")])
def test_imported_hf_model_exports_with_its_own_tokenizer(tmp_path, variant, arch, pre):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from _hf_models import build

    model_dir = build(variant, tmp_path / variant)
    model, tok, _ = load_model(model_dir)
    path = export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == arch and field(r, "tokenizer.ggml.pre") == pre
    got = tensors(r)
    for name, a in expected(model, arch).items():
        assert np.array_equal(got[name][1], a), name
    toks, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(toks) == model.config.vocab_size
    for name, i in tok.special_ids.items():
        assert toks[i] == name and types[i] == gguf.TokenType.CONTROL
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    if tok.bos_token_id is None:
        assert "tokenizer.ggml.bos_token_id" not in r.fields
    else:
        assert field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    # the stored vocabulary + merges, under the model's own pre-tokenizer, encode as the model's tokenizer does
    spec = tok.to_hf_json()
    spec["model"]["vocab"] = {t: i for i, (t, k) in enumerate(zip(toks, types)) if k == gguf.TokenType.NORMAL}
    spec["model"]["merges"] = [m.split(" ") for m in field(r, "tokenizer.ggml.merges")]
    spec["added_tokens"] = [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False}
                            for i, (t, k) in enumerate(zip(toks, types)) if k == gguf.TokenType.CONTROL]
    import json

    rebuilt = Tokenizer.from_str(json.dumps(spec))
    assert rebuilt.encode(HELD_OUT, add_special_tokens=False).ids == tok.encode(HELD_OUT)

    if llama_cpp_bin("llama-tokenize") and llama_cpp_bin("llama-simple"):
        env = {**os.environ, "LD_LIBRARY_PATH": str(Path(llama_cpp_bin("llama-simple")).parent)}
        ids = subprocess.run([llama_cpp_bin("llama-tokenize"), "-m", str(path), "-p", HELD_OUT, "--ids", "--no-bos",
                              "--no-escape", "--no-parse-special", "--log-disable"],
                             capture_output=True, text=True, env=env, check=True)
        assert json.loads(ids.stdout.strip().splitlines()[-1]) == tok.encode(HELD_OUT)
        prompt = "The king"
        start = ([tok.bos_token_id] if field(r, "tokenizer.ggml.add_bos_token") else []) + tok.encode(prompt)
        x, gen = torch.tensor([start]), []
        specials = set(tok.special_ids.values())
        with torch.no_grad():
            for _ in range(32):
                nxt = int(model(x)[0, -1].argmax())
                if nxt in specials:   # llama.cpp stops at its end-of-generation set; compare up to any special
                    break
                gen.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], 1)
        out = subprocess.run([llama_cpp_bin("llama-simple"), "-m", str(path), "-n", "32", prompt],
                             capture_output=True, env=env, check=True).stdout
        head = (tok.decode_bytes(start[:1]) if start[0] != tok.encode(prompt)[0] else b"") + prompt.encode()
        assert out.startswith(head + tok.decode_bytes(gen)), (out, head + tok.decode_bytes(gen))
