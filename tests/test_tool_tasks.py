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
