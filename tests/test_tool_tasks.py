"""The tool tasks: well-formed OpenAI tool conversations whose tool results are what the real tools return,
disjoint splits, checkers that tell right from wrong, and a document collection that answers by search."""

import json

import jsonschema
import pytest

from gptstack.data.tasks import facts, get_task, list_tasks, parse_task_list, tool_facts, tool_multiply
from gptstack.infer import retrieval, tools

TOOL_TASKS = ["tool_multiply", "tool_facts"]
N = 60


@pytest.fixture(scope="module")
def examples():
    return {name: {split: get_task(name).generate(split, N, seed=3) for split in ("train", "test")}
            for name in TOOL_TASKS}


@pytest.fixture(scope="module")
def facts_index():
    return retrieval.build_index(tool_facts.documents(), embedder="bm25")


def test_tool_tasks_are_registered_but_opt_in():
    assert set(TOOL_TASKS) <= set(list_tasks(opt_in=True))
    assert not set(TOOL_TASKS) & set(list_tasks())           # 'all' (the default mixture) leaves them out
    assert not set(TOOL_TASKS) & set(parse_task_list("all"))
    assert parse_task_list("all,tool_multiply")[0] == "tool_multiply"
    assert "tool_facts" in parse_task_list("spelling,tool_facts:2")


@pytest.mark.parametrize("name", TOOL_TASKS)
def test_conversations_follow_the_openai_tool_convention(examples, name):
    for split in ("train", "test"):
        for ex in examples[name][split]:
            roles = [m["role"] for m in ex.messages]
            assert roles == ["user", "assistant", "tool", "assistant"]
            call_msg, result = ex.messages[1], ex.messages[2]
            assert call_msg["content"] == "" and len(call_msg["tool_calls"]) == 1
            call = call_msg["tool_calls"][0]
            assert call["type"] == "function" and result["tool_call_id"] == call["id"]
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in ex.tools}
            assert call["function"]["name"] in schema
            args = json.loads(call["function"]["arguments"])       # a JSON string, as OpenAI sends it
            jsonschema.validate(args, schema[call["function"]["name"]])
            # the model is asked the question alone: the call, its result and the answer are its to produce
            assert ex.prompt_messages() == ex.messages[:1]
            assert ex.reference() == ex.messages[-1]["content"]
            assert ex.conversation() == {"messages": ex.messages, "tools": ex.tools}


def test_calculator_results_are_the_calculators_output(examples):
    assert tool_multiply.calculator_schema() == tools.CALCULATOR_SCHEMA
    for ex in examples["tool_multiply"]["train"] + examples["tool_multiply"]["test"]:
        call = ex.messages[1]["tool_calls"][0]["function"]
        assert ex.messages[2]["content"] == tools.calculator_call(call["arguments"]) == ex.answer
        a, b = ex.meta["a"], ex.meta["b"]
        assert 100 <= a < 100_000 and 100 <= b < 100_000 and ex.answer == str(a * b)
        assert ex.messages[-1]["content"] == f"Answer: {ex.answer}"


@pytest.mark.parametrize("name", TOOL_TASKS)
def test_held_out_problems_are_disjoint_from_training(name):
    task = get_task(name)
    if name == "tool_multiply":
        key = lambda ex: ex.meta["pair"]   # noqa: E731  (the unordered operands: b * a is the same problem)
    else:
        key = lambda ex: ex.meta["entity"]   # noqa: E731  (train and test ask about different entities)
    train = {key(e) for e in task.generate("train", 3000, seed=0)}
    test = [key(e) for e in task.generate("test", 400, seed=1)]
    assert len(set(test)) > 100 and not train & set(test)
    questions = [e.prompt_messages()[0]["content"] for e in task.generate("test", 400, seed=0)]
    assert len(set(questions)) == 400          # 400 distinct held-out problems, for the measurement


@pytest.mark.parametrize("name", TOOL_TASKS)
def test_checker_accepts_right_and_refuses_wrong_answers(examples, name):
    task = get_task(name)
    exs = examples[name]["train"]
    for i, ex in enumerate(exs):
        assert task.extract(ex.reference()) == ex.answer
        assert task.check(ex, ex.reference()) == 1.0
        assert task.check(ex, " " + ex.reference() + "<|assistant_end|> Answer: 0") == 1.0
        wrong = next(o for o in exs[i + 1:] + exs[:i] if o.answer.lower() != ex.answer.lower())
        assert task.check(ex, wrong.reference()) == 0.0
        assert task.check(ex, "") == 0.0 and task.check(ex, "I do not know.") == 0.0
    ex = exs[0]
    if name == "tool_multiply":
        off_by_one = str(int(ex.answer) + 1)
        assert task.check(ex, f"Answer: {off_by_one}") == 0.0
        assert task.check(ex, f"Answer: {int(ex.answer):,}") == 1.0     # thousands separators are the same number
    else:   # naming every value of the document is not an answer
        ex = next(e for e in exs if e.meta["distractors"])
        assert task.check(ex, ex.answer + " or " + ex.meta["distractors"][0]) == 0.0


def test_search_finds_each_questions_document_and_its_answer(examples, facts_index):
    assert len(facts_index) == len(tool_facts.documents())
    for ex in examples["tool_facts"]["train"] + examples["tool_facts"]["test"]:
        query = json.loads(ex.messages[1]["tool_calls"][0]["function"]["arguments"])["query"]
        (_, top), = facts_index.search(query, k=1)
        assert top.source == ex.meta["source"]
        assert tool_facts.search_result(top.source, top.text) == ex.messages[2]["content"]
        assert ex.answer in top.text


def test_tool_facts_world_is_its_own():
    # the invented entities appear only in this task's documents, not in the `facts` task's contexts
    ours = {e.name for e in facts.world(tool_facts.TOOL_WORLD)}
    theirs = {e.name for e in facts.world(0)}
    assert len(ours) == facts.N_COUNTRIES + facts.N_PEOPLE and not ours & theirs


# ---- eval/tools.py --------------------------------------------------------------------------------------

def test_call_validity_names_what_is_wrong():
    from gptstack.eval.tools import call_problem, call_validity

    offered = [tools.CALCULATOR_SCHEMA, tool_facts.search_schema()]

    def call(name, arguments):
        return {"id": "c", "type": "function", "function": {"name": name, "arguments": arguments}}

    good = [call("calculator", '{"expression": "2 * 3"}'), call("search", '{"query": "Droushia"}')]
    assert [call_problem(c, offered) for c in good] == [None, None]
    assert call_problem(call("python", "{}"), offered) == "unknown tool 'python'"
    assert call_problem(call("calculator", '{"expression": "2 *'), offered) == "arguments are not JSON"
    assert call_problem(call("calculator", '["2 * 3"]'), offered) == "arguments are not a JSON object"
    assert call_problem(call("calculator", '{"expr": "2"}'), offered).startswith("arguments do not match")
    assert call_problem(call("calculator", '{"expression": 6}'), offered).startswith("arguments do not match")
    assert call_problem({"id": "c"}, offered) == "not a function call"
    v = call_validity(good + [call("calculator", "{"), call("calculator", "{}")], offered)
    assert (v["calls"], v["valid"], v["rate"]) == (4, 2, 0.5)
    assert v["problems"] == {"arguments are not JSON": 1, "arguments do not match the schema": 1}
    assert call_validity([], offered)["rate"] is None


def test_paired_sign_test():
    from gptstack.eval.tools import paired, sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)        # 2 * 0.5**10
    assert sign_test(3, 1) == pytest.approx(2 * 5 / 16)         # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    r = paired([1, 1, 0, 0, 1], [0, 1, 0, 1, 0])
    assert (r["a"], r["b"], r["only_a"], r["only_b"], r["n"]) == (3, 2, 2, 1, 5)
    from gptstack.errors import ConfigError
    with pytest.raises(ConfigError, match="same problems"):
        paired([1, 0], [1])


def test_tool_spec_builds_a_search_index_that_answers(tmp_path):
    from gptstack.errors import ConfigError
    from gptstack.eval.tools import tool_spec

    assert tool_spec("tool_multiply", tmp_path) == "calculator"
    spec = tool_spec("tool_facts", tmp_path)
    assert spec == f"search:{tmp_path / 'tool_facts_index'}"
    index = retrieval.Index.load(spec.split(":", 1)[1])
    ex = tool_facts.generate("test", 1, seed=5)[0]
    assert index.search(ex.meta["question"], k=1)[0][1].source == ex.meta["source"]
    stamp = (tmp_path / "tool_facts_index" / "meta.json").stat().st_mtime_ns
    assert tool_spec("tool_facts", tmp_path) == spec           # same documents: the index is kept
    assert (tmp_path / "tool_facts_index" / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="uses no tools"):
        tool_spec("spelling", tmp_path)


@pytest.fixture(scope="module")
def tiny_model():
    from gptstack.data.tasks import generate_mixture
    from gptstack.model.gpt import GPT, GPTConfig
    from gptstack.tokenizer import Tokenizer

    texts = [m["content"] for e in generate_mixture("tool_multiply,tool_facts", "train", 30, 0) for m in e.messages]
    tok = Tokenizer.train(texts * 3, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, mlp_hidden=64,
                          seq_len=128))
    model.init_weights(0)
    return model.eval(), tok


def test_no_tools_arm_scores_the_question_alone(tiny_model):
    from gptstack.errors import ConfigError
    from gptstack.eval.tools import evaluate_tool_tasks, format_tool_table

    model, tok = tiny_model
    r = evaluate_tool_tasks(model, tok, "tool_multiply,tool_facts", n=3, arms=("no_tools",), max_tokens=4)
    assert list(r["tasks"]) == ["tool_multiply", "tool_facts"]
    for task in r["tasks"]:
        assert len(r["scores"][task]["no_tools"]) == 3 and r["tasks"][task]["no_tools"] == 0.0  # untrained
    assert "tool_multiply" in format_tool_table(r)
    with pytest.raises(ConfigError, match="unknown tool-eval arm"):
        evaluate_tool_tasks(model, tok, "tool_multiply", n=1, arms=("oracle",))
    with pytest.raises(ConfigError, match="spelling use no tools"):
        evaluate_tool_tasks(model, tok, "spelling,tool_multiply", n=1, arms=("no_tools",))
