"""Base-model mixing: the mixture is exact, weight 0 is the chat model, the base cache stays in sync as rows
finish, and grammar masks survive mixing."""

import pytest
import torch

from _infer_util import tiny_model
from gptstack.errors import ConfigError
from gptstack.infer.engine import Engine
from gptstack.infer.mixing import MixingHook, mixed_generate
from gptstack.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return tiny_model(tiny_tokenizer, seed=0), tiny_model(tiny_tokenizer, seed=1)


def test_mixture_is_exact_per_step(models, tiny_tokenizer):
    chat, base = models
    engine = Engine(chat, tiny_tokenizer)
    p = tiny_tokenizer.encode("The king", bos=True)
    w = 0.4
    out, _ = mixed_generate(engine, base, [p], SamplingParams(temperature=1.0, seed=0, max_tokens=6, logprobs=True,
                                                              stop_token_ids=[]), w)
    toks = out[0][0].tokens
    # recompute every step's mixture by full forwards of both models
    hook = MixingHook(base, w)
    with torch.no_grad():
        for i in range(len(toks)):
            seq = torch.tensor([p + toks[:i]])
            pc = torch.softmax(chat(seq)[0, -1], -1)
            pb = torch.softmax(base(seq)[0, -1], -1)
            hook.begin([p + toks[:i]], 1)
            hook.start(1)
            got = torch.softmax(hook.process(chat(seq)[:, -1], torch.tensor([0])), -1)[0]
            assert torch.allclose(got, (1 - w) * pc + w * pb, atol=1e-5)


def test_weight_zero_is_chat_model_and_rows_stay_in_sync(models, tiny_tokenizer):
    chat, base = models
    engine = Engine(chat, tiny_tokenizer)
    ps = [tiny_tokenizer.encode(t, bos=True) for t in ("The king", "Thou art a lord", "Night")]
    plain = engine.generate(ps, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[]))
    zero, _ = mixed_generate(engine, base, ps, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[]), 0.0)
    assert [c[0].tokens for c in plain] == [c[0].tokens for c in zero]
    # rows finishing at different steps (stop on a token row 0 emits early) must not desync the base cache:
    # greedy mixed output of each prompt alone equals the batched one
    stop = [plain[0][0].tokens[2]]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=stop, n=2)
    batched, _ = mixed_generate(engine, base, ps, params, 0.5, mode="entropy")
    for p, b in zip(ps, batched):
        alone, _ = mixed_generate(engine, base, [p], params, 0.5, mode="entropy")
        assert [c.tokens for c in b] == [c.tokens for c in alone[0]]


def test_entropy_gate_weight():
    from gptstack.infer import mixing

    chat = torch.tensor([[10.0, 0.0, 0.0, 0.0]])        # confident
    base = torch.zeros(1, 4)                             # uniform: entropy ln 4
    h = mixing.MixingHook.__new__(mixing.MixingHook)
    h.weight, h.mode, h.weights_used, h.logits = 0.8, "entropy", [], base
    mixed = torch.softmax(h.mix(chat), -1)
    pc = torch.softmax(chat, -1)
    hc = -(pc * pc.log()).sum()
    w = 0.8 * (torch.log(torch.tensor(4.0)) - hc) / torch.log(torch.tensor(4.0))
    assert torch.allclose(mixed, (1 - w) * pc + w * 0.25, atol=1e-6)
    h.logits = chat.clone()                              # same entropy as the chat model: no mixing
    assert torch.allclose(torch.softmax(h.mix(chat), -1), pc, atol=1e-6)


def test_masks_survive_and_bad_weight(models, tiny_tokenizer):
    chat, base = models
    h = MixingHook(base, 0.5)
    p = tiny_tokenizer.encode("x", bos=True)
    h.begin([p], 1)
    h.start(1)
    logits = torch.zeros(1, tiny_tokenizer.vocab_size)
    logits[0, 10:] = float("-inf")
    out = h.process(logits, torch.tensor([0]))
    assert torch.isinf(out[0, 10:]).all() and torch.isfinite(out[0, :10]).all()
    with pytest.raises(ConfigError):
        MixingHook(base, 1.5)
    with pytest.raises(ConfigError):
        MixingHook(base, 0.5, mode="nope")
