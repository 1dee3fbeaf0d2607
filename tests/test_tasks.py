import json
import re

import jsonschema
import pytest

from gptstack.data import tasks
from gptstack.data.tasks import Example, facts, get_task, generate_mixture, list_tasks, parse_task_list
from gptstack.data.tasks._arithmetic import working
from gptstack.errors import DataError
from gptstack.tokenizer import validate_messages

ALL = list_tasks()
N = 40


@pytest.fixture(scope="module")
def examples():
    return {name: {split: get_task(name).generate(split, N, seed=0) for split in ("train", "test")} for name in ALL}


def test_registry_has_every_task_with_the_interface():
    assert set(ALL) == {"arithmetic_cot", "arithmetic_direct", "spelling", "extraction", "shakespeare",
                        "greetings", "facts"}
    for name in ALL:
        module = get_task(name)
        assert module.NAME == name and module.DESCRIPTION
        assert callable(module.generate) and callable(module.extract) and callable(module.check)


def test_unknown_task_and_split_are_data_errors():
    with pytest.raises(DataError, match="known tasks: .*arithmetic_cot"):
        get_task("nope")
    with pytest.raises(DataError, match="split"):
        get_task("arithmetic_cot").generate("validation", 3)
    with pytest.raises(DataError):
        parse_task_list("spelling,nope")
    with pytest.raises(DataError):
        parse_task_list(" , ")


def test_parse_task_list():
    assert parse_task_list("all") == ALL
    assert parse_task_list(" spelling, facts ,spelling") == ["spelling", "facts"]


@pytest.mark.parametrize("name", ALL)
def test_examples_are_well_formed_conversations(examples, name):
    for split in ("train", "test"):
        exs = examples[name][split]
        assert len(exs) == N
        for ex in exs:
            assert isinstance(ex, Example) and ex.task == name
            validate_messages(ex.messages)
            assert ex.messages[-1]["role"] == "assistant"
            assert ex.prompt_messages() == ex.messages[:-1] and ex.prompt_messages()[-1]["role"] == "user"
            assert ex.reference() == ex.messages[-1]["content"]


@pytest.mark.parametrize("name", ALL)
def test_reference_scores_one_and_extracts_the_answer(examples, name):
    module = get_task(name)
    for ex in examples[name]["train"] + examples[name]["test"]:
        assert module.extract(ex.reference()) == ex.answer, ex
        assert module.check(ex, ex.reference()) == 1.0, ex
        # robust to surrounding whitespace and text after the end token
        assert module.check(ex, "  " + ex.reference() + " \n<|assistant_end|>garbage Answer: 0") == 1.0


@pytest.mark.parametrize("name", ALL)
def test_wrong_answers_score_below_one(examples, name):
    module = get_task(name)
    exs = examples[name]["train"]
    for i, ex in enumerate(exs):
        wrong = next(o for o in exs[i + 1:] + exs[:i] if o.answer.lower() != ex.answer.lower())
        assert module.check(ex, wrong.reference()) < 1.0, (ex, wrong.reference())
        assert module.check(ex, "") == 0.0
        assert module.check(ex, "I do not know.") == 0.0
        assert 0.0 <= module.check(ex, wrong.reference()) <= 1.0


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_examples_other_seed_others(name):
    module = get_task(name)
    a, b = module.generate("train", 20, seed=3), module.generate("train", 20, seed=3)
    assert a == b
    assert module.generate("train", 20, seed=4) != a
    assert module.generate("test", 0) == []


def _split_key(ex):
    # what each task's split is a function of
    if ex.task.startswith("arithmetic"):
        return ex.meta["problem"]
    if ex.task == "facts":
        return ex.meta["entity"]
    return ex.messages[0]["content"]


@pytest.mark.parametrize("name", ALL)
def test_train_and_test_splits_are_disjoint(name):
    module = get_task(name)
    n = 300 if name != "greetings" else 100
    train = {_split_key(e) for seed in (0, 1) for e in module.generate("train", n, seed=seed)}
    test = {_split_key(e) for seed in (0, 1) for e in module.generate("test", n // 3, seed=seed)}
    assert train and test and not train & test
    # and the questions themselves never cross over
    train_q = {e.messages[0]["content"] for e in module.generate("train", n, seed=0)}
    assert not train_q & {e.messages[0]["content"] for e in module.generate("test", n // 3, seed=0)}


def test_examples_are_unique_within_a_split_while_the_space_allows():
    exs = get_task("arithmetic_cot").generate("test", 200, seed=0)
    assert len({e.messages[0]["content"] for e in exs}) == 200


def test_small_spaces_serve_any_n_with_repeats():
    exs = get_task("greetings").generate("test", 400, seed=0)
    assert len(exs) == 400
    assert len({e.messages[0]["content"] for e in exs}) < 400


def test_cot_and_direct_share_test_problems_and_differ_in_format():
    cot = get_task("arithmetic_cot").generate("test", 30, seed=7)
    direct = get_task("arithmetic_direct").generate("test", 30, seed=7)
    assert [e.meta["problem"] for e in cot] == [e.meta["problem"] for e in direct]
    assert [e.answer for e in cot] == [e.answer for e in direct]
    for c, d in zip(cot, direct):
        assert d.reference() == f"Answer: {d.answer}"
        assert c.reference().endswith(f"\nAnswer: {c.answer}") and "write" in c.reference()
        assert eval(c.meta["problem"]) == int(c.answer)


def test_column_working_is_correct_and_regular():
    assert working(47, "+", 385) == "7+5=12, write 2 carry 1. 4+8+1=13, write 3 carry 1. 0+3+1=4, write 4."
    assert working(385, "-", 47) == "15-7=8, write 8 borrow 1. 8-4-1=3, write 3. 3-0=3, write 3."
    assert working(999, "+", 999).endswith("9+9+1=19, write 9 carry 1. 0+0+1=1, write 1.")
    for ex in get_task("arithmetic_cot").generate("train", 200, seed=1):
        written = [int(c.split("write ")[1][0]) for c in ex.reference().split("\n")[0].split(". ") if "write" in c]
        assert int("".join(map(str, written[::-1]))) == int(ex.answer)


def test_arithmetic_extract_tolerates_formatting():
    m = get_task("arithmetic_direct")
    assert m.extract("Answer: 1,234") == "1234"
    assert m.extract("answer:  0432.") == "432"
    assert m.extract("Answer: 5\nAnswer: 7") == "5"  # the first committed answer counts
    assert m.extract("432") is None


def test_spelling_counts_and_spells_real_words():
    m = get_task("spelling")
    exs = m.generate("train", 100, seed=0)
    kinds = {e.meta["kind"] for e in exs}
    assert kinds == {"count", "spell"}
    for e in exs:
        assert 4 <= len(e.meta["word"]) <= 9 and e.meta["word"].isalpha()
        if e.meta["kind"] == "count":
            letter = e.messages[0]["content"].split("'")[1]
            assert int(e.answer) == e.meta["word"].count(letter)
            # the spelling with a running tally of the asked letter, whose last mark is the answer
            tallied = e.reference().split("\n")[0]
            assert re.sub(r"=\d+", "", tallied) == ",".join(e.meta["word"])
            marks = [int(part.split("=")[1]) for part in tallied.split(",") if "=" in part]
            assert marks == list(range(1, int(e.answer) + 1))
        else:
            assert e.reference() == e.answer == ",".join(e.meta["word"])
            assert m.check(e, e.reference()) == 1.0 and m.check(e, "k,i,n,g") == 0.0
    assert m.tally("boldness", "s") == "b,o,l,d,n,e,s=1,s=2" and m.tally("king", "q") == "k,i,n,g"
    assert m.extract("Answer: g, e, n") == "g,e,n"
    # no constant answer is right on most counting questions
    from collections import Counter

    for n in (40, 300):
        exs = m.generate("test", n, seed=1)
        answers = Counter(min(int(e.answer), 2) for e in exs if e.meta["kind"] == "count")
        assert set(answers) == {0, 1, 2} and max(answers.values()) - min(answers.values()) <= 1, answers
        assert abs(sum(e.meta["kind"] == "spell" for e in exs) - 0.3 * n) <= 1
        assert len(exs) == n


def test_extraction_answers_validate_against_schema():
    m = get_task("extraction")
    jsonschema.Draft202012Validator.check_schema(m.SCHEMA)
    for e in m.generate("train", 50) + m.generate("test", 20):
        obj = json.loads(e.answer)
        jsonschema.validate(obj, m.SCHEMA)
        assert str(obj["age"]) in e.messages[0]["content"] and obj["city"] in e.messages[0]["content"]


def test_extraction_partial_credit():
    m = get_task("extraction")
    ex = m.generate("test", 1, seed=2)[0]
    f = ex.meta["fields"]
    assert m.check(ex, "not json") == 0.0
    assert m.check(ex, json.dumps({"name": f["name"], "age": f["age"] + 1, "city": "Nowhere"})) == pytest.approx(1 / 3)
    assert m.check(ex, "Here it is:\n```json\n" + json.dumps({"city": f["city"], "name": f["name"].upper(),
                                                              "age": str(f["age"])}) + "\n```") == 1.0
    assert m.extract(json.dumps({"city": f["city"], "age": f["age"], "name": f["name"]})) == ex.answer


def test_shakespeare_passages_and_titles():
    m = get_task("shakespeare")
    assert min(len(p) for p in m.passages_by_play().values()) > 300   # every play parses into many passages
    exs = m.generate("train", 200, seed=0)
    assert len({e.answer for e in exs}) == 8  # balanced over the eight plays
    for e in exs[:50]:
        heading, line, heading2, line2 = e.meta["passage"].split("\n")
        assert m._is_heading(heading) and m._is_heading(heading2) and "[" not in line + line2
        assert e.meta["passage"] in e.messages[0]["content"]
    test = {e.meta["passage"] for e in m.generate("test", 100, seed=0)}
    assert not test & {e.meta["passage"] for e in exs}
    ex = next(e for e in exs if e.answer == "A Midsummer Night's Dream")
    for reply in ("a midsummer night's dream", "Midsummer Nights Dream.", "Answer: A Midsummer Night's Dream"):
        assert m.check(ex, reply) == 1.0
    assert m.check(ex, "Hamlet") == 0.0
    lear = next(e for e in exs if e.answer == "King Lear")
    assert m.check(lear, "Lear") == 1.0 and m.extract("lear") == "King Lear"


def test_greetings_key_phrases():
    m = get_task("greetings")
    exs = m.generate("train", 100)
    identity = next(e for e in exs if e.meta["category"] == "identity")
    assert "gptstack" in identity.reference()
    assert m.check(identity, "I am gptstack.") == 1.0 and m.check(identity, "Hello!") == 0.0
    hello = next(e for e in exs if e.meta["category"] == "greeting")
    assert m.check(hello, "Hi! Nice to meet you.") == 1.0
    assert {e.meta["category"] for e in m.generate("test", 100)} == set(m.CATEGORIES)


def test_facts_documents_context_and_entity_split():
    docs = facts.documents()
    assert len(docs) == facts.N_COUNTRIES + facts.N_PEOPLE and len({s for s, _ in docs}) == len(docs)
    texts = dict(docs)
    for split in ("train", "test"):
        for e in facts.generate(split, 30, seed=0):
            assert e.answer in texts[e.meta["source"]]
            assert texts[e.meta["source"]] in e.meta["context"]
            assert e.meta["question"] in e.messages[0]["content"] and e.meta["context"] in e.messages[0]["content"]
            assert facts.rag_prompt(e.meta["question"], e.meta["context"].split("\n")) == e.messages[0]["content"]
            # parroting the context (which names a distractor) is no answer
            assert facts.check(e, e.meta["context"]) == 0.0
            assert facts.check(e, f"It is {e.answer}.") == 1.0
    train_entities = {e.meta["entity"] for e in facts.generate("train", 300)}
    test_entities = {e.meta["entity"] for e in facts.generate("test", 100)}
    assert not train_entities & test_entities and len(test_entities) >= 20
    # each attribute's values come from its own small vocabulary, so a reply cannot be right by type alone
    vocab = {}
    for e in facts.world():
        for a, v in e.attributes.items():
            vocab.setdefault(a, set()).add(v)
    assert len(vocab["capital"]) > 10 and len(vocab["currency"]) > 5 and not vocab["capital"] & vocab["currency"]


def test_mixture_is_interleaved_and_deterministic():
    mix = generate_mixture(["arithmetic_direct", "greetings"], "train", 3, seed=0)
    assert [e.task for e in mix] == ["arithmetic_direct", "greetings"] * 3
    assert mix == generate_mixture("arithmetic_direct,greetings", "train", 3, seed=0)
    assert mix[0] == get_task("arithmetic_direct").generate("train", 3, seed=0)[0]
    assert tasks.check_example(mix[1], mix[1].reference()) == 1.0


def test_mixture_weights_scale_counts_and_spread_through_the_data():
    from gptstack.data.tasks import parse_task_weights

    assert parse_task_weights("spelling:3, greetings") == {"spelling": 3.0, "greetings": 1.0}
    assert set(parse_task_weights("spelling:2,all")) == set(list_tasks())
    assert parse_task_weights("spelling:2,all")["spelling"] == 2.0
    assert parse_task_list("spelling:2,greetings") == ["spelling", "greetings"]
    for bad in ("spelling:x", "spelling:0", "spelling:-1", "nosuchtask:2", "spelling:inf", "spelling:nan",
                "spelling:1e9"):
        with pytest.raises(DataError):
            parse_task_weights(bad)
    mix = generate_mixture("spelling:3,greetings", "train", 20, seed=0)
    assert [e.task for e in mix].count("spelling") == 60 and len(mix) == 80
    first = [e.task for e in mix[:20]]   # a prefix holds each task in its share
    assert first.count("spelling") == 15 and first.count("greetings") == 5
