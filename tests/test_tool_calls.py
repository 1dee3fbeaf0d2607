"""Tool calls in the chat format (our tokens and an imported model's template), the SFT loader's tool
conversations, and constrained tool calls from an untrained model."""

import json

import pytest

from gptstack.errors import DataError

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "exact arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}


def _call(call_id, name, args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TWO_CALLS = [
    {"role": "user", "content": "2*3 and the weather in Oslo?"},
    {"role": "assistant", "content": "Let me look.",
     "tool_calls": [_call("call_a", "calculator", {"expression": "2*3"}), _call("call_b", "weather", {"city": "Oslo"})]},
    {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
    {"role": "tool", "tool_call_id": "call_a", "content": "6"},
    {"role": "assistant", "content": "6, and rain."},
]


def _trained(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


# ---- our format -----------------------------------------------------------------------------------------

def test_our_rendering_and_mask_with_two_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = tok.render_conversation(TWO_CALLS, tools=[CALC, WEATHER])
    tools_text = "Tools:\n" + json.dumps(CALC["function"]) + "\n" + json.dumps(WEATHER["function"])
    assert tok.decode(ids) == (
        "<|bos|><|system_start|>" + tools_text + "<|system_end|>"
        "<|user_start|>2*3 and the weather in Oslo?<|user_end|>"
        "<|assistant_start|>Let me look."
        '<|python_start|>{"name": "calculator", "arguments": {"expression": "2*3"}}<|python_end|>'
        '<|python_start|>{"name": "weather", "arguments": {"city": "Oslo"}}<|python_end|><|assistant_end|>'
        "<|output_start|>rain<|output_end|><|output_start|>6<|output_end|>"
        "<|assistant_start|>6, and rain.<|assistant_end|>")
    # trained: the assistant's text, both calls with their tokens, each <|assistant_end|>; not tools or outputs
    assert _trained(tok, ids, mask) == (
        'Let me look.<|python_start|>{"name": "calculator", "arguments": {"expression": "2*3"}}<|python_end|>'
        '<|python_start|>{"name": "weather", "arguments": {"city": "Oslo"}}<|python_end|><|assistant_end|>'
        "6, and rain.<|assistant_end|>")
    # a system prompt goes before the tool list; the prompt after the results opens the assistant's next turn
    with_system = [{"role": "system", "content": "Be brief."}] + TWO_CALLS[:4]
    prompt = tok.decode(tok.render_prompt(with_system, tools=[CALC]))
    assert prompt.startswith("<|bos|><|system_start|>Be brief.\n\nTools:\n" + json.dumps(CALC["function"]))
    assert prompt.endswith("<|output_start|>6<|output_end|><|assistant_start|>")


def test_plain_conversations_render_as_before(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, mask = tok.render_conversation(conv)
    assert tok.decode(ids) == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>hello<|assistant_end|>"
    assert tok.render_conversation(conv, tools=[]) == (ids, mask)


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "6"}], "without a preceding assistant tool call"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                           "function": {"name": "calculator", "arguments": "{2*3"}}]},
      {"role": "tool", "content": "6"}, {"role": "assistant", "content": "6"}], "arguments are not JSON"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [_call("c1", "calculator", {})]},
      {"role": "assistant", "content": "6"}], "have no result"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [_call("c1", "calculator", {})]},
      {"role": "tool", "tool_call_id": "c9", "content": "6"}, {"role": "assistant", "content": "6"}], "names no pending call"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [_call("c1", "calculator", {})]}],
     "ends with 1 tool call"),
])
def test_bad_tool_conversations_are_one_line_errors(tiny_tokenizer, messages, error):
    with pytest.raises(DataError, match=error):
        tiny_tokenizer.render_conversation(messages, tools=[CALC])


def test_sft_loader_reads_openai_tool_jsonl(tmp_path, tiny_tokenizer):
    from gptstack.data.chat import encode_conversations, load_conversations

    good = {"messages": [{"role": "user", "content": "2*3?"},
                         {"role": "assistant", "content": None, "tool_calls": [_call("c1", "calculator", {"expression": "2*3"})]},
                         {"role": "tool", "tool_call_id": "c1", "content": "6"},
                         {"role": "assistant", "content": "6"}], "tools": [CALC]}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(good) + "\n")
    convs = load_conversations(str(path))
    assert convs[0].tools == [CALC] and convs[0][1]["content"] == "" and convs[0][2]["tool_call_id"] == "c1"
    (ids, mask), = encode_conversations(tiny_tokenizer, convs, 512)[0]
    assert (ids, mask) == tiny_tokenizer.render_conversation(good["messages"][:1] + convs[0][1:], tools=[CALC])
    assert "Tools:" in tiny_tokenizer.decode(ids) and "Tools:" not in _trained(tiny_tokenizer, ids, mask)

    bad_args = json.loads(json.dumps(good))
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    orphan = {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "6"},
                           {"role": "assistant", "content": "y"}]}
    for line, record, error in ((2, bad_args, "arguments are not JSON"), (2, orphan, "without a preceding")):
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"tools.jsonl:{line}: .*{error}") as e:
            load_conversations(str(path))
        assert "\n" not in str(e.value)


# ---- an imported model's template -------------------------------------------------------------------------

# a ChatML template with a tools section and <tool_call> blocks, the shape Qwen2/Qwen3 templates have
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for tc in message.tool_calls %}{{- '\\n<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": '"
    " + (tc.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content"
    " + '\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _hf_tok(tmp_path, template):
    from _hf_models import train_tokenizer

    from gptstack.hub.tokenizer import HFTokenizer

    train_tokenizer(tmp_path)
    return HFTokenizer((tmp_path / "tokenizer.json").read_text(), {"eos_token": "<|im_end|>"}, chat_template=template)


def test_hf_template_tool_format_and_mask(tmp_path):
    tok = _hf_tok(tmp_path, TOOL_TEMPLATE)
    fmt = tok.tool_format()
    assert fmt["ok"] and fmt["open"] == "<tool_call>\n" and fmt["close"] == "\n</tool_call>"
    ids, mask = tok.render_conversation(TWO_CALLS, tools=[CALC, WEATHER])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>\n" + json.dumps(CALC))
    assert "<tool_response>\nrain\n</tool_response>" in text
    assert _trained(tok, ids, mask) == (
        'Let me look.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
        "6, and rain.<|im_end|>")
    assert tok.decode(tok.render_prompt(TWO_CALLS[:4], tools=[CALC])).endswith(
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_hf_template_without_tool_format_is_an_error(tmp_path):
    from _hf_models import CHATML_QWEN

    tok = _hf_tok(tmp_path, CHATML_QWEN)
    assert not tok.tool_format()["ok"]
    with pytest.raises(DataError, match="has no tool format"):
        tok.render_conversation(TWO_CALLS, tools=[CALC])
    with pytest.raises(DataError, match="has no tool format"):
        tok.render_prompt(TWO_CALLS[:1], tools=[CALC])
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert sum(tok.render_conversation(plain)[1]) > 0   # conversations without tools are unaffected


# ---- constrained calls from an untrained model -------------------------------------------------------------

VARIED = [
    {"type": "function", "function": {"name": "book_flight", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["origin", "passengers", "when"],
        "properties": {
            "origin": {"type": "string", "enum": ["OSL", "LHR", "SFO"]},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "when": {"type": "object", "additionalProperties": False, "required": ["day"],
                     "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 31},
                                    "flexible": {"type": "boolean"}}},
            "seats": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}}}}},
    {"type": "function", "function": {"name": "scale", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["factor"],
        "properties": {"factor": {"type": "number", "minimum": -5, "maximum": 5},
                       "note": {"type": "string", "maxLength": 12}}}}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},
                                                                     "additionalProperties": False}}},
]


def _validate(call, tools):
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call["function"]["name"] in schemas
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, schemas[call["function"]["name"]])
    assert call["id"].startswith("call_")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "book_flight"}}, "auto"])
def test_untrained_model_calls_always_parse_and_validate(tiny_tokenizer, choice):
    from _infer_util import tiny_model

    from gptstack.infer.agent import parse_tool_calls, turn_setup
    from gptstack.infer.engine import Engine
    from gptstack.infer.sampling import SamplingParams

    engine = Engine(tiny_model(tiny_tokenizer, seq_len=1024), tiny_tokenizer)
    prompt = tiny_tokenizer.render_prompt([{"role": "user", "content": "book it"}], tools=VARIED)
    calls, finished = 0, 0
    for seed in range(3):
        params = SamplingParams(temperature=1.0, max_tokens=160, n=4, seed=seed)
        hooks, p = turn_setup(engine, VARIED, params, choice)
        assert hooks, "a constrained turn has the grammar hook"
        for reply in engine.generate([prompt], p, hooks=hooks)[0]:
            text, got, problems = parse_tool_calls(tiny_tokenizer, reply.tokens)
            if reply.finish_reason == "stop":
                finished += 1
                assert all(why is None for why in problems), problems
            else:   # out of tokens: only the last call may be unfinished
                assert all(why is None for why in problems[:-1])
                got = got[:len(got) - (problems[-1:] != [None])] if problems else got
            if choice != "auto":
                assert text == "" and (got or reply.finish_reason == "length")
            if isinstance(choice, dict):
                assert len(got) <= 1 and all(c["function"]["name"] == "book_flight" for c in got)
            for call in got:
                _validate(call, VARIED)
            calls += len(got)
    if choice != "auto":
        assert finished >= 6 and calls >= 6   # the random model does finish calls, and they are all valid


def test_tool_choice_none_bans_calls_and_bad_choices_are_errors(tiny_tokenizer):
    from _infer_util import tiny_model

    from gptstack.errors import ConfigError
    from gptstack.infer.agent import turn_setup
    from gptstack.infer.engine import Engine
    from gptstack.infer.sampling import SamplingParams

    engine = Engine(tiny_model(tiny_tokenizer, seq_len=1024), tiny_tokenizer)
    prompt = tiny_tokenizer.render_prompt([{"role": "user", "content": "hi"}], tools=VARIED)
    hooks, p = turn_setup(engine, VARIED, SamplingParams(temperature=1.0, max_tokens=40, n=8, seed=1), "none")
    # make the call-start token overwhelmingly likely: the ban must still hold
    start = tiny_tokenizer.special("<|python_start|>")
    from _infer_util import BanHook

    class Favour(BanHook):
        def process(self, logits, rows):
            logits = logits.clone()
            logits[:, start] += 100.0
            return logits

    for reply in engine.generate([prompt], p, hooks=[Favour(start), *hooks])[0]:
        assert start not in reply.tokens
    for bad, error in (("sometimes", "tool_choice must be"),
                       ({"type": "function", "function": {"name": "nope"}}, "not among the tools")):
        with pytest.raises(ConfigError, match=error):
            turn_setup(engine, VARIED, SamplingParams(), bad)
