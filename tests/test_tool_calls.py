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
