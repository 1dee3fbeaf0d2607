"""Shared fixtures: a small deterministic corpus, a tiny tokenizer, a tiny GPT config.

GPTSTACK_HOME points at .cache/test-home inside the repo so tests never touch a user's cache, while the
one-time Shakespeare download is kept between test runs.
"""

import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTSTACK_HOME", str(REPO / ".cache" / "test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fixed thread count: training would otherwise fit its threads to the free cores at each start, and tests that
# compare two in-process runs bit for bit must not see the count change between them (test_devices covers it).
os.environ.setdefault("GPTSTACK_THREADS", str(os.cpu_count() or 1))

WORDS = ("the king queen lord lady love death night day sword crown heart blood fair sweet good noble "
         "speak hear see come go thou thee thy art hath doth shall will would should must may").split()


def make_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 10)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice([".", ",", "!", "?"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (d / f"play_{i}.txt").write_text(make_text(300, i))
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from gptstack.tokenizer import Tokenizer

    return Tokenizer.train([make_text(400, s) for s in range(3)] + ["0123456789 héllo wörld"], vocab_size=320)


@pytest.fixture
def tiny_config(tiny_tokenizer):
    from gptstack.model.gpt import GPTConfig

    return GPTConfig(vocab_size=tiny_tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                     mlp_hidden=128, seq_len=64)
