import math

import pytest
import torch

from gptstack.eval.diversity import (EntropyProbe, diversity_metrics, distinct_n, measure_stage,
                                     next_token_entropy, self_bleu, sentence_bleu, words)


def test_distinct_n_hand_computed():
    samples = ["a b a", "A c"]                       # words: [a b a] [a c]
    assert distinct_n(samples, 1) == pytest.approx(3 / 5)   # a b a a c: 3 unique of 5
    assert distinct_n(samples, 2) == pytest.approx(1.0)     # (a b) (b a) (a c)
    assert distinct_n(samples, 3) == pytest.approx(1.0)     # (a b a)
    assert distinct_n(["a", "b"], 2) is None                # no bigrams at all
    assert words("Hi, there!") == ["hi", ",", "there", "!"]


def test_distinct_averages_over_prompts():
    m = diversity_metrics([["a b", "a b"], ["x y", "z w"]], embed=False)
    assert m["distinct_1"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert m["distinct_2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert m["n_prompts"] == 2 and m["k"] == 2 and "embedding_similarity" not in m


def test_sentence_bleu_hand_computed():
    hyp, ref = words("the cat sat on the mat"), words("the cat sat on a mat")
    # p1 = 5/6 (the clipped to 1), p2 = (3+1)/(5+1), p3 = (2+1)/(4+1), p4 = (1+1)/(3+1); c == r so BP = 1
    expected = (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert sentence_bleu(hyp, [ref]) == pytest.approx(expected)
    assert self_bleu(["the cat sat on the mat", "the cat sat on a mat"]) == pytest.approx(expected)
    # brevity penalty: every precision is 1 (add-one on empty higher orders), c=2 < r=4
    assert sentence_bleu(words("the cat"), [words("the cat sat on")]) == pytest.approx(math.exp(1 - 4 / 2))
    assert sentence_bleu(words("dog"), [words("the cat")]) == 0.0
    assert sentence_bleu([], [ref]) == 0.0
    # the closest reference length is used for the brevity penalty
    assert sentence_bleu(words("a b c"), [words("a b c x y z w"), words("a b c")]) == pytest.approx(1.0)


def test_identical_samples_collapse():
    m = diversity_metrics([["the same reply here"] * 4, ["x y z"] * 4], embed=False)
    assert m["self_bleu"] == pytest.approx(1.0)
    assert m["distinct_1"] == pytest.approx(0.25)
    assert m["distinct_2"] == pytest.approx(0.25)
    varied = diversity_metrics([["the cat sat", "a dog ran off", "birds sing loudly", "no way"]], embed=False)
    assert varied["self_bleu"] < 0.2 and varied["distinct_1"] == pytest.approx(1.0)
    assert self_bleu(["only one"]) is None


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, **kw):
        return torch.zeros(*idx.shape, self.vocab) + 0 * self.w


def test_entropy_of_uniform_model_is_log_v():
    V = 50
    ent = next_token_entropy(Uniform(V), None, [[1, 2, 3], [4]], [[[5, 6], [7]], [[8, 9, 10], []]])
    assert ent == pytest.approx(math.log(V))


def test_entropy_counts_the_sampled_positions(tiny_tokenizer, tiny_config):
    from gptstack.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(tiny_config)
    model.init_weights(0)
    prompt, sample = [1, 2, 3], [4, 5]
    got = next_token_entropy(model, tiny_tokenizer, [prompt], [[sample]])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + sample])).float(), -1)[0]
    ent = -(logp.exp() * logp).sum(-1)
    assert got == pytest.approx(float(ent[2:4].mean()), rel=1e-5)   # positions 2 and 3 predict tokens 4, 5
    one = next_token_entropy(model, tiny_tokenizer, [prompt], [[[]]])  # an empty sample: the stop decision
    assert one == pytest.approx(float(ent[2]), rel=1e-5)


class UniformHook:
    def start(self, n_rows): pass
    def process(self, logits, rows): return torch.zeros_like(logits)
    def accept(self, rows, tokens): pass
    def finished(self, row): return False


def test_measure_stage_end_to_end(tiny_tokenizer):
    from gptstack.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2,
                    mlp_hidden=64, seq_len=512)
    model = GPT(cfg)
    model.init_weights(0)
    m = measure_stage(model, tiny_tokenizer, "arithmetic_direct,spelling", n_prompts=4, k=3, seed=0,
                      max_tokens=8, embed=False)
    for key in ("distinct_1", "distinct_2", "distinct_3", "self_bleu", "entropy", "quality"):
        assert key in m
    assert m["n_prompts"] == 4 and m["k"] == 3 and m["mixed"] is False
    assert 0.0 <= m["quality"] <= 1.0 and set(m["quality_per_task"]) == {"arithmetic_direct", "spelling"}
    assert 0 < m["entropy"] <= math.log(cfg.vocab_size) + 1e-4
    assert len(m["examples"]) == 3 and len(m["examples"][0]["samples"]) == 3
    # a hook is measured on what it makes the model sample from: here the uniform distribution
    mixed = measure_stage(model, tiny_tokenizer, ["spelling"], n_prompts=2, k=2, seed=0, max_tokens=4,
                          hooks=[UniformHook()], embed=False)
    assert mixed["mixed"] is True
    assert mixed["entropy"] == pytest.approx(math.log(cfg.vocab_size), rel=1e-5)


def test_entropy_probe_ignores_masked_tokens():
    probe = EntropyProbe()
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    assert probe.process(logits, torch.tensor([0])) is logits
    assert probe.mean == pytest.approx(math.log(2))


@pytest.mark.slow
def test_embedding_similarity_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = diversity_metrics([["The king is dead.", "The king is dead.", "The king is dead."],
                           ["I love apples.", "Quantum fields are strange.", "The train leaves at nine."]])
    from gptstack.eval.diversity import embedding_similarity

    same = embedding_similarity([["The king is dead."] * 3])
    different = embedding_similarity([["I love apples.", "Quantum fields are strange.", "The train leaves at nine."]])
    assert same == pytest.approx(1.0, abs=1e-4)
    assert different < 0.5
    assert m["embedding_similarity"] == pytest.approx((same + different) / 2, abs=1e-4)
