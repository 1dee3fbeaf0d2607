"""Dataset cartography and KL-anchored SFT: the anchored loss against a hand computation, the per-conversation
record against the model's own log-probabilities, exact resume of the record, the cartography map in headless
Chromium, the easy-first / hard-first orders, and the one-line errors."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from _infer_util import save_run, tiny_model
from gptstack.cli import main
from gptstack.data.chat import ChatBatches, encode_conversations
from gptstack.errors import ConfigError, DataError

CHROMIUM = "/usr/bin/chromium"


def _convs(n=12, topic="cat"):
    return [[{"role": "user", "content": f"{topic} {i}?"},
             {"role": "assistant", "content": f"{topic} {'ha ' * (i % 4)}{i} </script>"}] for i in range(n)]


def _write(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_tokenizer):
    model = tiny_model(tiny_tokenizer, seq_len=128)
    with torch.no_grad():   # milder logits than the inference tests' spread-out init: a model that can learn
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.1)
    return save_run(tmp_path_factory.mktemp("base") / "run", model, tiny_tokenizer)


def _cfg(out, data, **kw):
    from gptstack.config import SFTConfig

    base = dict(out=str(out), data=data, steps=6, minutes=0.0, batch_size=2, seq_len=64, val_conversations=0,
                log_every=1, eval_every=0, progress=False, device="cpu", optimizer="adamw", lr=3e-3,
                warmup_frac=0.0)
    base.update(kw)
    return SFTConfig(**base)


# ---- the KL-anchored loss -----------------------------------------------------------------------------------
def test_anchored_ce_equals_a_hand_computation():
    from gptstack.train.losses import anchored_ce

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
    base = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    targets = torch.tensor([0, 2])
    ce, kl = 0.0, 0.0
    for t in range(2):
        p = [math.exp(v) / sum(math.exp(u) for u in logits[t].tolist()) for v in logits[t].tolist()]
        q = [math.exp(v) / sum(math.exp(u) for u in base[t].tolist()) for v in base[t].tolist()]
        ce += -math.log(p[int(targets[t])]) / 2
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
    loss, token_logp, got_kl = anchored_ce(logits, targets, base, beta=0.3)
    assert float(got_kl) == pytest.approx(kl, rel=1e-6) and kl > 0.1
    assert float(loss) == pytest.approx(ce + 0.3 * kl, rel=1e-6)
    assert float(-token_logp.mean()) == pytest.approx(ce, rel=1e-6)
    zero, _, _ = anchored_ce(logits, targets, base, beta=0.0)
    assert float(zero) == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-6)


def test_sft_objective_on_a_tiny_model_matches_conversation_by_conversation(tiny_tokenizer):
    """Packed batch, KL to another model: equal to CE + beta KL computed one conversation at a time from full
    logits; with beta 0 it is plain SFT's loss."""
    from gptstack.train.sft import SFTObjective, sft_loss

    policy, base = tiny_model(tiny_tokenizer, seed=0), tiny_model(tiny_tokenizer, seed=1)
    encoded, _ = encode_conversations(tiny_tokenizer, _convs(3), 129)
    batch = next(ChatBatches(encoded, 1, 128, seed=0, pack=True))
    assert int(batch["doc_ids"].max()) >= 2   # several conversations share the row
    in_row = [int(batch["example_ids"][0][batch["doc_ids"][0] == d][0]) for d in range(int(batch["doc_ids"].max()) + 1)]
    ce_sum = kl_sum = 0.0
    count = 0
    with torch.no_grad():
        for ids, mask in (encoded[i] for i in in_row):
            lp = torch.log_softmax(policy(torch.tensor([ids[:-1]]))[0], -1)
            lq = torch.log_softmax(base(torch.tensor([ids[:-1]]))[0], -1)
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    ce_sum -= float(lp[t, ids[t + 1]])
                    kl_sum += float((lp[t].exp() * (lp[t] - lq[t])).sum())
                    count += 1
        loss, metrics = SFTObjective(0.5, base, None)(policy, batch)
        plain, _ = SFTObjective(0.0, None, None)(policy, batch)
        assert float(plain) == pytest.approx(float(sft_loss(policy, batch)[0]), rel=1e-6)
    assert metrics["kl_to_base"] == pytest.approx(kl_sum / count, rel=1e-4) and kl_sum > 0
    assert float(loss) == pytest.approx(ce_sum / count + 0.5 * kl_sum / count, rel=1e-4)
    assert float(plain) == pytest.approx(ce_sum / count, rel=1e-4)


def test_kl_to_base_trains_and_its_base_stays_the_start(base_run, tmp_path):
    """Full finetuning and LoRA: the run logs ce + kl_to_base, the KL starts at 0 (base = start) and grows."""
    from gptstack.train.sft import sft

    data = _write(tmp_path / "d.jsonl", _convs(8))
    for lora in (False, True):
        out = tmp_path / f"kl_{lora}"
        sft(base_run, _cfg(out, data, steps=3, kl_to_base=0.2, lora=lora, lora_rank=4, lr=1e-2))
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        kls = [r["kl_to_base"] for r in rows if "kl_to_base" in r]
        assert len(kls) == 3 and kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-5, kls
        assert all(r["loss"] == pytest.approx(r["ce"] + 0.2 * r["kl_to_base"], rel=1e-4) for r in rows if "ce" in r)


# ---- cartography --------------------------------------------------------------------------------------------
def test_cartography_record_matches_the_models_log_probs(base_run, tmp_path, tiny_tokenizer):
    from gptstack.data.cartography import read_cartography
    from gptstack.runs import load_model
    from gptstack.train.sft import sft

    convs = _convs(12)
    data = _write(tmp_path / "d.jsonl", convs)
    out = tmp_path / "run"
    sft(base_run, _cfg(out, data, cartography=True, steps=8))
    header, records = read_cartography(out)
    assert header["n"] == 12 and len(records) == 12
    assert all(r["epochs"] >= 2 for r in records)
    for r in records:
        c = r["confidences"]
        mean = sum(c) / len(c)
        assert r["confidence"] == pytest.approx(mean, abs=1e-6)
        assert r["variability"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in c) / len(c)), abs=1e-6)
        assert 0 <= r["correctness"] <= 1 and 0 < r["confidence"] <= 1 and "cat" in r["text"]
    # the first step trains on the base model's weights: its conversations' first confidence is exp(-CE) there
    from gptstack.train.sft import load_sft_data

    train_convs, _, _, _ = load_sft_data(_cfg(out, data))
    encoded, _ = encode_conversations(tiny_tokenizer, train_convs, 65)
    first = next(ChatBatches(encoded, 2, 64, seed=0, pack=True))
    base, _, _ = load_model(base_run)
    ids_in_first = sorted(set(first["example_ids"][first["targets"] >= 0].tolist()))
    assert ids_in_first
    with torch.no_grad():
        for i in ids_in_first:
            ids, mask = encoded[i]
            lp = torch.log_softmax(base(torch.tensor([ids[:-1]]))[0], -1)
            gold = [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1]]
            expected = math.exp(sum(gold) / len(gold))
            assert records[i]["confidences"][0] == pytest.approx(expected, rel=1e-4)
    # the training-dynamics map, and its HTML in headless Chromium
    mapdir = tmp_path / "map"
    assert main(["datamap", "--cartography", str(out), "--out", str(mapdir)]) == 0
    assert (mapdir / "cartography.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page_html = (mapdir / "cartography.html").read_text()
    assert "http://" not in page_html and "https://" not in page_html
    _check_page_in_chromium(mapdir / "cartography.html")


def _check_page_in_chromium(path):
    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("needs the system Chromium")
    problems = []
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(path.as_uri())
        assert "12 conversations" in page.inner_text("#summary")
        assert "ambiguous" in page.inner_text("#legend") and "hard-to-learn" in page.inner_text("#legend")
        box = page.locator("#map").bounding_box()
        xy = page.evaluate("(() => [sx(pts[0].x), sy(pts[0].y)])()")
        page.mouse.move(box["x"] + xy[0], box["y"] + xy[1])
        tip = page.inner_text("#tip")
        assert "confidence" in tip and "</script>" in tip
        page.select_option("#colorby", "correctness")
        page.select_option("#colorby", "label")
        browser.close()
    assert problems == []


def test_cartography_resume_reproduces_the_uninterrupted_record(base_run, tmp_path, monkeypatch):
    import gptstack.train.loop as loop
    from gptstack.train.sft import sft

    data = _write(tmp_path / "d.jsonl", _convs(10))
    sft(base_run, _cfg(tmp_path / "full", data, cartography=True, steps=5))
    real_train = loop.train

    def interrupted_at_2(stage, cfg):
        def stop(step, metrics):
            if step == 2:
                raise KeyboardInterrupt
        stage.after_step = stop
        return real_train(stage, cfg)

    monkeypatch.setattr(loop, "train", interrupted_at_2)
    with pytest.raises(KeyboardInterrupt):
        sft(base_run, _cfg(tmp_path / "part", data, cartography=True, steps=5))
    monkeypatch.setattr(loop, "train", real_train)
    part = [json.loads(l) for l in (tmp_path / "part" / "cartography.jsonl").read_text().splitlines()[1:]]
    assert 0 < sum(r["epochs"] for r in part)
    sft(base_run, _cfg(tmp_path / "part", data, cartography=True, steps=5, resume=True))
    full = [json.loads(l) for l in (tmp_path / "full" / "cartography.jsonl").read_text().splitlines()[1:]]
    resumed = [json.loads(l) for l in (tmp_path / "part" / "cartography.jsonl").read_text().splitlines()[1:]]
    assert [r["epochs"] for r in full] == [r["epochs"] for r in resumed]
    for a, b in zip(full, resumed):
        assert a["confidences"] == pytest.approx(b["confidences"], rel=1e-5)


def test_regions_follow_the_stated_rule():
    from gptstack.data.cartography import assign_regions

    conf = [0.9, 0.8, 0.2, 0.5, 0.1, 0.95]
    var = [0.01, 0.3, 0.02, 0.25, 0.0, 0.02]
    # top third by variability: 1, 3 -> ambiguous; the rest's median confidence (upper) is 0.9
    assert assign_regions(conf, var) == ["easy-to-learn", "ambiguous", "hard-to-learn", "ambiguous",
                                         "hard-to-learn", "easy-to-learn"]


# ---- easy-first / hard-first ----------------------------------------------------------------------------------
def _fake_cartography(path, convs, confidences):
    from gptstack.data.cartography import CartographyRecorder

    rec = CartographyRecorder(convs, ["x"] * len(convs))
    for i, c in enumerate(confidences):
        if c is not None:
            rec.record([i, i], [c, c], [0.0, 0.0], [0.5, 0.5])
    rec.write(path, {})
    return str(path)


def test_confidence_orders_are_permutations_in_order(tmp_path):
    from gptstack.data.cartography import confidences_for
    from gptstack.data.datamap import curriculum_order

    convs = _convs(5)
    path = _fake_cartography(tmp_path / "c.jsonl", convs, [0.5, 0.9, None, 0.1, 0.9])
    shuffled = [convs[i] for i in (4, 0, 3, 2, 1)]   # another run's shuffle: matched by content, not position
    keys = confidences_for(shuffled, path)
    assert keys == [0.9, 0.5, 0.1, None, 0.9]
    assert curriculum_order(keys, "easy-first") == [0, 4, 1, 2, 3]   # ties by index, never-seen last
    assert curriculum_order(keys, "hard-first") == [2, 1, 0, 4, 3]
    with pytest.raises(DataError, match="different data set"):
        confidences_for(_convs(5, topic="dog"), path)
    with pytest.raises(DataError, match="different data set"):
        confidences_for(convs[:4], path)


def test_sft_easy_first_trains_in_confidence_order(base_run, tmp_path, monkeypatch):
    import gptstack.train.loop as loop
    from gptstack.train.sft import sft

    convs = _convs(6)
    data = _write(tmp_path / "d.jsonl", convs)
    conf = [0.3, 0.9, 0.1, 0.6, 0.8, 0.2]
    cart = _fake_cartography(tmp_path / "c.jsonl", convs, conf)
    captured = {}
    real_train = loop.train

    def spy(stage, cfg):
        captured["batches"] = stage.batches
        captured["index_of"] = stage.loss_fn.index_of
        return real_train(stage, cfg)

    monkeypatch.setattr(loop, "train", spy)
    for order, expected in (("easy-first", [1, 4, 3, 0, 5, 2]), ("hard-first", [2, 5, 0, 3, 4, 1])):
        sft(base_run, _cfg(tmp_path / order, data, order=order, cartography_from=cart, steps=1, pack=False,
                           batch_size=1))
        b = captured["batches"]
        # data-set index of each conversation in the (fixed) epoch order
        assert [captured["index_of"][i] for i in b.fixed_order] == expected


def test_cli_cartography_errors_are_one_line(base_run, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _convs(6))
    other = _fake_cartography(tmp_path / "other.jsonl", _convs(6, topic="dog"), [0.5] * 6)
    common = ["--steps", "1", "--minutes", "0", "--batch-size", "2", "--no-progress", "--device", "cpu",
              "--val-conversations", "0", "--data", data]
    assert main(["sft", base_run, "--out", str(tmp_path / "o1"), "--order", "easy-first", "--cartography-from",
                 other] + common) == 2
    err = capsys.readouterr().err
    assert "different data set" in err and err.count("\n") == 1
    assert not (tmp_path / "o1" / "model.safetensors").exists()
    assert main(["sft", base_run, "--out", str(tmp_path / "o2"), "--order", "hard-first"] + common) == 2
    assert "--cartography-from" in capsys.readouterr().err
    assert main(["sft", base_run, "--out", str(tmp_path / "o3"), "--cartography-from", other] + common) == 2
    assert "easy-first or hard-first" in capsys.readouterr().err
    assert main(["sft", base_run, "--out", str(tmp_path / "o4"), "--kl-to-base", "-1"] + common) == 2
    assert "--kl-to-base" in capsys.readouterr().err
    assert main(["sft", base_run, "--out", str(tmp_path / "o5"), "--order", "easy-first", "--cartography-from",
                 str(tmp_path / "nope")] + common) == 2
    assert "does not exist" in capsys.readouterr().err
    # a map needs variability: one epoch is refused; and DATA xor --cartography
    one = _fake_cartography(tmp_path / "one.jsonl", _convs(6), [None] * 6)
    assert main(["datamap", "--cartography", one, "--out", str(tmp_path / "m")]) == 2
    assert "at least 3" in capsys.readouterr().err
    assert main(["datamap", "--out", str(tmp_path / "m")]) == 2
    assert "either DATA" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something else"}\n')
    assert main(["datamap", "--cartography", str(bad), "--out", str(tmp_path / "m")]) == 2
    assert "not a cartography file" in capsys.readouterr().err


def test_config_refuses_order_without_its_map():
    from gptstack.config import SFTConfig

    with pytest.raises(ConfigError, match="cartography-from"):
        SFTConfig(order="easy-first", seq_len=64).validate()
    SFTConfig(order="easy-first", cartography_from="x.jsonl", seq_len=64).validate()
