"""Task evaluation: structure, determinism, the checker plumbing, the mode extension point, tables."""

import pytest

from gptstack.errors import ConfigError
from gptstack.eval import tasks as ev
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup():
    from gptstack.data.tasks import generate_mixture

    tok = Tokenizer.train([m["content"] for e in generate_mixture("all", "train", 30, 0) for m in e.messages] * 3,
                          vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, mlp_hidden=128,
                          seq_len=128))
    model.init_weights(0)
    return model.eval(), tok


def test_structure_and_greedy_is_deterministic(setup):
    model, tok = setup
    kw = dict(task_names="greetings,arithmetic_direct", n=4, max_tokens=6, seed=3)
    r1 = ev.evaluate_tasks(model, tok, **kw)
    r2 = ev.evaluate_tasks(model, tok, **kw)
    assert list(r1["tasks"]) == ["greetings", "arithmetic_direct"]
    assert r1["modes"] == ["greedy", "sample"] and r1["settings"]["split"] == "test"
    for row in r1["tasks"].values():
        assert set(row) == {"greedy", "sample"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert r1["tasks"] == r2["tasks"]  # greedy, and sampling with a seed, are reproducible
    ex = r1["examples"]["greetings"][0]
    assert set(ex) == {"prompt", "reference", "completion", "reward"}


def test_checker_plumbing_with_an_oracle_mode(setup):
    """A mode that answers with the reference scores 1 on every task; one that answers nothing scores 0."""
    model, tok = setup
    from gptstack.data.tasks import get_task

    def oracle(engine, examples, task, settings, max_tokens):
        check = get_task(task).check
        return [check(e, e.reference()) for e in examples], [e.reference() for e in examples]

    def silent(engine, examples, task, settings, max_tokens):
        check = get_task(task).check
        return [check(e, "") for e in examples], ["" for _ in examples]

    ev.register_mode("oracle", oracle)
    ev.register_mode("silent", silent)
    try:
        r = ev.evaluate_tasks(model, tok, "all", n=5, modes=("oracle", "silent"))
    finally:
        ev.MODES.pop("oracle")
        ev.MODES.pop("silent")
    assert all(row["oracle"] == 1.0 for row in r["tasks"].values()), r["tasks"]
    assert all(row["silent"] == 0.0 for row in r["tasks"].values()), r["tasks"]
    assert r["mean"] == {"oracle": 1.0, "silent": 0.0}


def test_greedy_mode_scores_what_the_engine_generates(setup, monkeypatch):
    """Greedy mode feeds rendered prompts to the engine at temperature 0 and checks what comes back."""
    model, tok = setup
    from gptstack.data.tasks import get_task
    from gptstack.infer.engine import Completion, Engine

    seen = {}

    def fake_generate(self, prompts, params=None, hooks=()):
        seen["temperature"] = params.temperature
        seen["prompts"] = prompts
        examples = get_task("arithmetic_direct").generate("test", 4, 0)
        return [[Completion(i, 0, text=f"Answer: {e.answer}" if i % 2 == 0 else "Answer: -1")]
                for i, e in enumerate(examples)]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    r = ev.evaluate_tasks(model, tok, "arithmetic_direct", n=4, modes=("greedy",))
    assert r["tasks"]["arithmetic_direct"]["greedy"] == 0.5
    assert seen["temperature"] == 0.0
    first = get_task("arithmetic_direct").generate("test", 4, 0)[0]
    assert seen["prompts"][0] == tok.render_prompt(first.prompt_messages())


def test_unknown_modes_and_bad_n(setup):
    model, tok = setup
    with pytest.raises(ConfigError, match="unknown eval mode"):
        ev.evaluate_tasks(model, tok, "greetings", n=2, modes=("beam",))
    with pytest.raises(ConfigError, match="maj@K"):
        ev.evaluate_tasks(model, tok, "greetings", n=2, modes=("maj@x",))
    with pytest.raises(ConfigError, match="at least 1"):
        ev.evaluate_tasks(model, tok, "greetings", n=0)
    from gptstack.errors import DataError

    with pytest.raises(DataError, match="unknown task"):
        ev.evaluate_tasks(model, tok, "nope", n=2)


def test_tables():
    result = {"tasks": {"a": {"greedy": 0.5, "sample": 0.25}, "b": {"greedy": 1.0, "sample": 0.75}},
              "mean": {"greedy": 0.75, "sample": 0.5}, "n": 4, "modes": ["greedy", "sample"],
              "settings": {"temperature": 0.8}, "seconds": 1.0}
    table = ev.format_table(result, title="t")
    assert "sample@T=0.8" in table and "0.750" in table and table.splitlines()[0] == "t"
    both = ev.compare_table({"base": result, "sft": result})
    assert "base/greedy" in both and "sft/sample" in both and both.count("0.750") == 4


def test_default_max_tokens_fits_the_longest_reference(setup):
    _, tok = setup
    from gptstack.data.tasks import get_task

    examples = get_task("arithmetic_cot").generate("test", 20, 0)
    longest = max(len(tok.encode(e.reference())) for e in examples)
    assert longest < ev.default_max_tokens(tok, examples) <= 256


def test_majority_vote_mode_uses_the_ensemble(setup, monkeypatch):
    """maj@3 over samples [right, wrong, right] scores 1; the first-sample pass@1 of [wrong, right, right] is 0."""
    model, tok = setup
    from gptstack.data.tasks import get_task
    from gptstack.infer.engine import Completion, Engine

    examples = get_task("arithmetic_direct").generate("test", 3, 0)
    pattern = {"maj@3": ["right", "wrong", "right"], "sample": ["wrong", "right", "right"]}
    current = {}

    def fake_generate(self, prompts, params=None, hooks=()):
        texts = pattern[current["mode"]][:params.n]
        return [[Completion(i, j, text=f"Answer: {e.answer}" if t == "right" else "Answer: -5")
                 for j, t in enumerate(texts)] for i, e in enumerate(examples)]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    for mode, want in (("maj@3", 1.0), ("sample", 0.0)):
        current["mode"] = mode
        r = ev.evaluate_tasks(model, tok, "arithmetic_direct", n=3, modes=(mode,))
        assert r["tasks"]["arithmetic_direct"][mode] == want
