"""SFT: the masked loss against a hand computation, every trainable parameter moves, resume equivalence, and
the CLI end to end (full and LoRA) on a tiny pretraining-shaped run made in the test."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptstack.cli import main
from gptstack.data.chat import ChatBatches, block_causal_mask, encode_conversations
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.tokenizer import Tokenizer
from gptstack.io import atomic_write_json, save_weights
from gptstack.runs import load_model
from gptstack.train.sft import SFTConfig, sft, sft_loss

CONVS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "Answer: 42"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Spell cat"},
     {"role": "assistant", "content": "c,a,t"}],
    [{"role": "user", "content": "Which play? To be or not to be"}, {"role": "assistant", "content": "Hamlet"}],
]


@pytest.fixture(scope="module")
def tok():
    from gptstack.data.tasks import generate_mixture

    texts = [m["content"] for e in generate_mixture("all", "train", 30, 0) for m in e.messages]
    return Tokenizer.train(texts * 3, vocab_size=300)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok) -> Path:
    """A run directory shaped like pretraining's output, with random weights."""
    run = tmp_path_factory.mktemp("base")
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, mlp_hidden=128,
                    seq_len=128)
    model = GPT(cfg)
    model.init_weights(0)
    with torch.no_grad():  # the init zeroes residual outputs; make every path carry gradient
        for n, p in model.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.02)
    save_weights(run / "model.safetensors", model.state_dict(), {"checkpoint_id": "base"})
    tok.save(run / "tokenizer")
    atomic_write_json(run / "config.json", {"kind": "lm", "stage": "pretrain", "model": cfg.to_dict(),
                                            "parent_run": None})
    return run


def tiny_cfg(out, **kw) -> SFTConfig:
    base = dict(out=str(out), steps=4, minutes=0.0, batch_size=4, seq_len=128, examples_per_task=8,
                val_conversations=7, eval_every=2, log_every=1, progress=False, device="cpu")
    base.update(kw)
    return SFTConfig(**base)


# ---- the loss -------------------------------------------------------------------------------------------------
def test_masked_loss_equals_hand_computed_ce_over_assistant_tokens(tok, base_run):
    model, _, _ = load_model(base_run)
    encoded, stats = encode_conversations(tok, CONVS, 129)
    assert stats["kept"] == 3
    batch = next(ChatBatches(encoded, 1, 128, seed=0, pack=True))
    assert int(batch["doc_ids"].max()) == 2  # all three packed into one row
    loss, _ = sft_loss(model, batch)
    # by hand: run each conversation alone, CE at the positions whose *next* token is assistant-masked
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in encoded:
            logits = model(torch.tensor([ids[:-1]]))[0]
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    total += float(F.cross_entropy(logits[t:t + 1], torch.tensor([ids[t + 1]])))
                    count += 1
    assert count == sum(sum(m) for _, m in encoded)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_unpacked_batches_give_the_same_loss(tok, base_run):
    model, _, _ = load_model(base_run)
    encoded, _ = encode_conversations(tok, CONVS, 129)
    packed = next(ChatBatches(encoded, 1, 128, seed=0, pack=True))
    padded = next(ChatBatches(encoded, 3, 128, seed=0, pack=False))
    assert int(padded["doc_ids"].max()) == 0
    with torch.no_grad():
        assert float(sft_loss(model, packed)[0]) == pytest.approx(float(sft_loss(model, padded)[0]), rel=1e-5)


def test_block_mask_keeps_conversations_apart(tok, base_run):
    """Changing the first packed conversation leaves the logits of the second unchanged."""
    model, _, _ = load_model(base_run)
    encoded, _ = encode_conversations(tok, CONVS[:2], 129)
    b1 = next(ChatBatches(encoded, 1, 128, seed=0, pack=True))
    b2 = {k: v.clone() for k, v in b1.items()}
    first = b1["doc_ids"][0] == 0
    b2["input_ids"][0, first] = (b2["input_ids"][0, first] + 7) % tok.vocab_size
    second = b1["doc_ids"][0] == 1
    with torch.no_grad():
        l1 = model(b1["input_ids"], position_ids=b1["position_ids"], attn_mask=block_causal_mask(b1["doc_ids"]))
        l2 = model(b2["input_ids"], position_ids=b2["position_ids"], attn_mask=block_causal_mask(b2["doc_ids"]))
    assert torch.allclose(l1[0, second], l2[0, second], atol=1e-5)
    assert not torch.allclose(l1[0, first], l2[0, first], atol=1e-3)


# ---- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_one_step_changes_every_trainable_parameter(tok, base_run, tmp_path, lora, monkeypatch):
    import gptstack.train.loop as loop

    captured = {}
    real_train = loop.train

    def spy(stage, cfg):
        captured["before"] = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
        captured["model"] = stage.model
        return real_train(stage, cfg)

    monkeypatch.setattr(loop, "train", spy)
    cfg = tiny_cfg(tmp_path / "run", steps=2, lora=lora, val_conversations=0, optimizer="adamw", lr=1e-3,
                   warmup_frac=0.0)
    sft(base_run, cfg)
    after = dict(captured["model"].named_parameters())
    before = captured["before"]
    assert before and (not lora or all("lora_" in n or "trainable_tokens" in n for n in before))
    if lora:  # the chat special tokens' embedding and head rows train with the adapter
        assert sum("trainable_tokens" in n for n in before) == 2
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, unchanged
    if lora:
        frozen = [n for n, p in after.items() if not p.requires_grad]
        assert frozen and "lm_head" in " ".join(frozen)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_reproduces_uninterrupted_run(tok, base_run, tmp_path, lora, monkeypatch):
    import gptstack.train.loop as loop

    sft(base_run, tiny_cfg(tmp_path / "full", steps=4, lora=lora))
    real_train = loop.train

    def interrupted_at_2(stage, cfg):
        def stop(step, metrics):
            if step == 2:
                raise KeyboardInterrupt  # what Ctrl-C does: the loop saves a resumable checkpoint
        stage.after_step = stop
        return real_train(stage, cfg)

    monkeypatch.setattr(loop, "train", interrupted_at_2)
    with pytest.raises(KeyboardInterrupt):
        sft(base_run, tiny_cfg(tmp_path / "part", steps=4, lora=lora))
    monkeypatch.setattr(loop, "train", real_train)
    state = json.loads((tmp_path / "part" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not state["finished"]
    sft(base_run, tiny_cfg(tmp_path / "part", steps=4, lora=lora, resume=True))
    m1, _, _ = load_model(tmp_path / "full")
    m2, _, _ = load_model(tmp_path / "part")
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(m1(x), m2(x), atol=1e-6)

    def losses(run):
        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], k): r[k] for r in rows for k in ("loss", "val_loss") if k in r and r["step"] > 2}
    assert losses("full") == pytest.approx(losses("part"), rel=1e-5)


def test_sft_run_records_parent_and_loads(tok, base_run, tmp_path):
    sft(base_run, tiny_cfg(tmp_path / "r", steps=1))
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["kind"] == "lm" and config["stage"] == "sft" and config["model"]["n_layer"] == 2
    assert Path(config["parent_run"]) == base_run.resolve()
    stats = config["data"]["train"]
    assert stats["conversations"] == 7 * 8 and stats["kept"] + stats["skipped"] == 7 * 8  # facts > 128 tokens
    model, t, _ = load_model(tmp_path / "r")
    assert t.fingerprint() == tok.fingerprint() and isinstance(model, GPT)


def test_truncated_conversations_are_counted_and_reported(tok, base_run, tmp_path, capsys):
    long_user = " ".join(["the king speaks"] * 80)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}] * 20
    rows += [{"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok"}]}] * 3
    rows += [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": long_user}, {"role": "assistant", "content": "c"}]}] * 2
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft(base_run, tiny_cfg(tmp_path / "r", steps=1, data=str(data), val_conversations=0))
    out = capsys.readouterr().out
    assert "2 conversations longer than the context were truncated" in out and "3 skipped" in out
    stats = json.loads((tmp_path / "r" / "config.json").read_text())["data"]["train"]
    assert stats["skipped"] == 3 and stats["truncated"] == 2


# ---- CLI ----------------------------------------------------------------------------------------------------
def test_cli_sft_eval_end_to_end(base_run, tmp_path, capsys):
    out = tmp_path / "sft"
    rc = main(["sft", str(base_run), "--out", str(out), "--steps", "2", "--minutes", "0", "--batch-size", "4",
               "--examples-per-task", "6", "--val-conversations", "7", "--no-progress", "--device", "cpu",
               "--tasks", "greetings,arithmetic_direct"])
    assert rc == 0
    assert (out / "model.safetensors").exists() and (out / "trainer_state.json").exists()
    rc = main(["eval", str(out), "--tasks", "greetings,arithmetic_direct", "--n-examples", "3", "--json",
               str(tmp_path / "e.json"), "--max-new-tokens", "8", "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["tasks"]) == {"greetings", "arithmetic_direct"}
    assert set(result["tasks"]["greetings"]) == {"greedy", "sample"}
    assert "greetings" in capsys.readouterr().out


def test_cli_lora_then_merge(base_run, tmp_path):
    out = tmp_path / "lora"
    assert main(["sft", str(base_run), "--out", str(out), "--steps", "1", "--minutes", "0", "--batch-size", "2",
                 "--examples-per-task", "3", "--val-conversations", "0", "--lora", "--lora-rank", "4",
                 "--tasks", "greetings", "--no-progress", "--device", "cpu"]) == 0
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert main(["eval", str(out), "--tasks", "greetings", "--n-examples", "2", "--max-new-tokens", "4",
                 "--modes", "greedy", "--quiet"]) == 0   # the engine runs on the PEFT-wrapped model
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["stage"] == "sft" and config["adapter"] is None


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_cli_bad_inputs_exit_2_with_a_clear_line(base_run, tmp_path, capsys):
    common = ["--steps", "1", "--minutes", "0", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text(good + "\n" + good + "\n{not json\n")
    assert main(["sft", str(base_run), "--data", str(bad), "--out", str(tmp_path / "o1")] + common) == 2
    assert "bad.jsonl:3" in _err(capsys)

    no_asst = tmp_path / "noasst.jsonl"
    no_asst.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["sft", str(base_run), "--data", str(no_asst), "--out", str(tmp_path / "o2")] + common) == 2
    assert "no assistant turn" in _err(capsys)

    order = tmp_path / "order.jsonl"
    order.write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                              {"role": "user", "content": "b"}]}) + "\n")
    assert main(["sft", str(base_run), "--data", str(order), "--out", str(tmp_path / "o3")] + common) == 2
    assert "roles out of order" in _err(capsys)

    assert main(["sft", str(tmp_path / "nope"), "--out", str(tmp_path / "o4")] + common) == 2
    assert "not a run directory" in _err(capsys)

    assert main(["sft", str(base_run), "--lora", "--lora-targets", "q_proj,wq", "--tasks", "greetings",
                 "--examples-per-task", "3", "--out", str(tmp_path / "o5")] + common) == 2
    err = _err(capsys)
    assert "'wq'" in err and "matches no" in err

    assert main(["sft", str(base_run), "--tasks", "nosuchtask", "--out", str(tmp_path / "o6")] + common) == 2
    assert "unknown task 'nosuchtask'" in _err(capsys)

    assert main(["eval", str(tmp_path), "--n-examples", "2"]) == 2
    assert "config.json" in _err(capsys)
    assert main(["merge", str(base_run), "--out", str(tmp_path / "m")]) == 2
    assert "no adapter" in _err(capsys)


def test_cli_tasks(tmp_path, capsys):
    assert main(["tasks", "list"]) == 0
    assert "arithmetic_cot" in capsys.readouterr().out
    assert main(["tasks", "show", "spelling"]) == 0
    assert "[assistant]" in capsys.readouterr().out
    out = tmp_path / "t.jsonl"
    assert main(["tasks", "generate", "greetings", "--split", "test", "--n", "5", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["messages"][-1]["role"] == "assistant"
    # the file is valid SFT data
    from gptstack.data.chat import load_conversations

    assert len(load_conversations(str(out))) == 5
    assert main(["tasks", "show", "nosuch"]) == 2


def test_lora_on_the_head_itself_trains_and_reloads(tok, base_run, tmp_path):
    """lm_head in --lora-targets: the head gets LoRA factors (no separate special-token rows for it, which PEFT
    cannot put on a LoRA layer), the run trains and loads back."""
    from gptstack.runs import load_model

    out = tmp_path / "head"
    sft(base_run, tiny_cfg(out, steps=1, lora=True, val_conversations=0,
                           lora_targets="q_proj,v_proj,lm_head"))
    import json

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in adapter["target_modules"]
    assert list(adapter["trainable_token_indices"]) == ["embed_tokens"]
    model, _, _ = load_model(out)
    assert any("lm_head" in n and "lora_A" in n for n, _ in model.named_parameters())
