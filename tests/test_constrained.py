"""Constrained decoding from an untrained random model: every output that finishes parses and validates."""

import json
import re

import jsonschema
import pytest

from _infer_util import tiny_model
from conftest import make_text
from gptstack.errors import ConfigError
from gptstack.infer.constrained import GrammarHook, compile_grammar, generate_constrained
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams
from gptstack.tokenizer import Tokenizer

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                           "maxItems": 3}},
                 "required": ["id", "tags"], "additionalProperties": False},
        "ok": {"type": "boolean"}},
     "required": ["user", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5},
                                      "y": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{3}$"},
    {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "boolean"},
               {"type": "object", "properties": {"k": {"const": "v"}}, "required": ["k"],
                "additionalProperties": False}]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                      "kind": {"enum": ["a", "b", 3, None]},
                                      "scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 100},
                                                 "minItems": 2, "maxItems": 2}},
     "required": ["date", "kind", "scores"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([make_text(300, s) for s in range(2)] + ['{"a": [1, 2.5], "b": true, "c": null}'],
                           vocab_size=300)


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(tiny_model(tok, seq_len=256), tok)


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_schema_outputs_validate(engine, tok, i):
    schema = SCHEMAS[i]
    grammar = compile_grammar(json_schema=schema, tokenizer=tok)
    prompts = [tok.encode("Reply:", bos=True), tok.encode("the king", bos=True)]
    for temperature in (1.0, 0.0):
        out = generate_constrained(engine, prompts, SamplingParams(temperature=temperature, seed=i, n=2,
                                                                   max_tokens=150), grammar)
        for c in (c for o in out for c in o):
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


def test_regex_and_lark(engine, tok):
    g = compile_grammar(regex=r"(yes|no), [0-9]{2} (apples|pears)", tokenizer=tok)
    for c in generate_constrained(engine, [tok.encode("Q", bos=True)], SamplingParams(n=4, seed=1), g)[0]:
        assert re.fullmatch(r"(yes|no), [0-9]{2} (apples|pears)", c.text), c.text
    lark = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[0-9]/\n'
    g = compile_grammar(lark=lark, tokenizer=tok)
    for c in generate_constrained(engine, [tok.encode("Q", bos=True)], SamplingParams(n=4, seed=2,
                                                                                      max_tokens=100), g)[0]:
        if c.finish_reason == "stop":
            assert re.fullmatch(r"[0-9()+*]+", c.text) and c.text.count("(") == c.text.count(")"), c.text
            eval(c.text)  # a well-formed arithmetic expression


def test_mask_is_exact(engine, tok):
    """Masked tokens are the ones llguidance forbids: at the start of an enum only tokens that begin a
    value survive."""
    g = compile_grammar(json_schema={"enum": ["alpha", "beta"]}, tokenizer=tok)
    hook = GrammarHook(tok, g)
    hook.start(1)
    import torch
    logits = hook.process(torch.zeros(1, tok.vocab_size), torch.tensor([0]))
    allowed = [tok.decode([i]) for i in torch.isfinite(logits[0]).nonzero().flatten().tolist()]
    assert allowed and all('"alpha"'.startswith(a) or '"beta"'.startswith(a) for a in allowed)
    # a model whose vocabulary is padded past the tokenizer's: the padding rows are never allowed, and a
    # prefetched mask (computed on the worker thread) is the same mask
    hook.start(1)
    hook.prefetch(torch.tensor([0]))
    wide = hook.process(torch.zeros(1, tok.vocab_size + 8), torch.tensor([0]))
    assert torch.equal(wide[:, :tok.vocab_size], logits) and torch.isinf(wide[0, tok.vocab_size:]).all()


@pytest.mark.parametrize("kw", [
    dict(json_schema='{"type": "object", "properties": '),           # not JSON
    dict(json_schema={"type": "nonsense"}),                           # not a schema
    dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}),  # unsatisfiable
    dict(json_schema=[1, 2]),
    dict(regex="(unclosed"),
    dict(regex=""),
    dict(lark="start: undefined_rule\n"),
    dict(),
    dict(regex="a", lark="start: \"a\""),
])
def test_bad_grammars_are_config_errors(tok, kw):
    with pytest.raises(ConfigError):
        compile_grammar(tokenizer=tok, **kw)
