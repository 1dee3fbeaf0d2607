"""The agent loop over a real (untrained, tiny) model: calls are executed and their results appended, the
loop stops at its step limit, search returns the index's text, tool failures become results."""

import json
import re

import pytest

from gptstack.errors import ConfigError


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    from _infer_util import tiny_model

    from gptstack.infer.engine import Engine

    return Engine(tiny_model(tiny_tokenizer, seq_len=1024), tiny_tokenizer)


def _pinned(tool, **enums):
    """`tool` with its arguments pinned by its schema (an enum of one value each): the constrained call of an
    untrained model is then exactly those arguments, and the tool itself runs on them."""
    from gptstack.infer.agent import Tool

    fn = json.loads(json.dumps(tool.schema["function"]))
    for key, value in enums.items():
        fn["parameters"]["properties"][key] = {"type": "string", "enum": [value]}
    return Tool(tool.name, {"type": "function", "function": fn}, tool.run)


def test_calculator_call_runs_and_its_result_is_appended(engine):
    from gptstack.infer.agent import calculator_tool, run_agent
    from gptstack.infer.sampling import SamplingParams

    calc = _pinned(calculator_tool(), expression="48213 * 739")
    seen = []
    result = run_agent(engine, [{"role": "user", "content": "What is 48213 * 739?"}], [calc],
                       SamplingParams(temperature=0.0, max_tokens=200), max_steps=1,
                       tool_choice={"type": "function", "function": {"name": "calculator"}}, on_message=seen.append)
    assert result.steps == 1 and result.stop_reason == "max_steps"
    user, call_msg, *results = result.messages
    assert call_msg["role"] == "assistant" and call_msg["tool_calls"] == result.calls
    assert len(results) == len(result.calls) == 1
    for call, res in zip(result.calls, results):
        assert json.loads(call["function"]["arguments"]) == {"expression": "48213 * 739"}
        assert res == {"role": "tool", "tool_call_id": call["id"], "content": "35629407"}
    assert seen == result.messages[1:]
    # the conversation the loop built renders (and so can be continued or trained on)
    engine.tokenizer.render_prompt(result.messages, tools=[calc.schema])


def test_loop_stops_at_its_step_limit(engine):
    from gptstack.infer.agent import calculator_tool, run_agent
    from gptstack.infer.sampling import SamplingParams

    calc = _pinned(calculator_tool(), expression="2 ** 100")
    for max_steps in (1, 3):
        result = run_agent(engine, [{"role": "user", "content": "go"}], [calc],
                           SamplingParams(temperature=1.0, max_tokens=200, seed=3), max_steps=max_steps,
                           tool_choice="required")
        assert 1 <= result.steps <= max_steps
        assert result.stop_reason in ("answer", "max_steps", "length")
        if result.stop_reason == "max_steps":
            assert result.steps == max_steps and result.messages[-1]["role"] == "tool"
        turns = [m for m in result.messages if m["role"] == "assistant"]
        assert len(turns) == result.steps
    with pytest.raises(ConfigError, match="max_steps"):
        run_agent(engine, [{"role": "user", "content": "go"}], [calc], max_steps=0)


def test_search_tool_returns_index_text(engine, tmp_path):
    from gptstack.infer.agent import run_agent, tools_from_spec
    from gptstack.infer.retrieval import build_index
    from gptstack.infer.sampling import SamplingParams

    docs = [("notes/zorblat", "The zorblat is a blue lizard that sings at dawn."),
            ("notes/quenth", "Quenth is a mountain town famous for copper bells.")]
    build_index(docs, embedder="bm25").save(tmp_path / "idx")
    search, calc = tools_from_spec(f"search:{tmp_path / 'idx'},calculator")
    assert (search.name, calc.name) == ("search", "calculator")
    assert search.run({"query": "copper bells town"}) == "[notes/quenth] Quenth is a mountain town famous for copper bells."
    pinned = _pinned(search, query="zorblat lizard")
    result = run_agent(engine, [{"role": "user", "content": "what is a zorblat?"}], [pinned],
                       SamplingParams(temperature=0.0, max_tokens=200), max_steps=1,
                       tool_choice={"type": "function", "function": {"name": "search"}})
    assert result.messages[-1]["content"] == "[notes/zorblat] The zorblat is a blue lizard that sings at dawn."


def test_tool_failures_become_results(engine):
    from gptstack.infer.agent import _run, calculator_tool, parse_tool_calls

    tools = {"calculator": calculator_tool()}
    call = {"id": "call_x", "type": "function", "function": {"name": "calculator",
                                                             "arguments": json.dumps({"expression": "1/0"})}}
    assert _run(tools, call, None).startswith("error: calculator: division by zero")
    other = {**call, "function": {"name": "shell", "arguments": "{}"}}
    assert "no tool named 'shell'" in _run(tools, other, None)
    # unconstrained text that is not a call is read as an invalid call, not an exception
    tok = engine.tokenizer
    ids = tok.encode("ok") + [tok.special("<|python_start|>")] + tok.encode("{calc") + [tok.special("<|python_end|>")]
    text, calls, problems = parse_tool_calls(tok, ids)
    assert text == "ok" and calls[0]["function"]["arguments"] == "{calc" and "not valid JSON" in problems[0]
    assert _run(tools, calls[0], problems[0]).startswith("error: the call is not valid JSON")


@pytest.mark.parametrize("spec, error", [("", "comma-separated"), ("shell", "unknown tool 'shell'"),
                                         ("search", "needs an index"), ("calculator,calculator", "named twice")])
def test_tools_from_spec_errors(spec, error):
    from gptstack.infer.agent import tools_from_spec

    with pytest.raises(ConfigError, match=error):
        tools_from_spec(spec)


def test_missing_index_is_a_clear_error(tmp_path):
    from gptstack.errors import GptstackError
    from gptstack.infer.agent import tools_from_spec

    with pytest.raises(GptstackError) as e:
        tools_from_spec(f"search:{tmp_path / 'nope'}")
    assert "\n" not in str(e.value)


# ---- the CLI --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, tiny_tokenizer):
    from _infer_util import save_run, tiny_model

    from gptstack.infer.retrieval import build_index

    d = tmp_path_factory.mktemp("toolrun")
    build_index([("notes/a", "The zorblat is a blue lizard.")], embedder="bm25").save(d / "idx")
    return save_run(d / "run", tiny_model(tiny_tokenizer, seq_len=1024), tiny_tokenizer), str(d / "idx")


def test_generate_with_tools_runs_the_loop_and_prints_calls(tool_run, capsys):
    from gptstack.cli import main
    from gptstack.infer.agent import calculator_tool, _run

    run, _ = tool_run
    code = main(["generate", run, "--prompt", "What is 2*3?", "--tools", "calculator", "--tool-choice", "calculator",
                 "--max-steps", "1", "--temperature", "0", "--max-new-tokens", "200", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 1 and out["stop_reason"] in ("max_steps", "length")
    call_msg, result = out["messages"][:2]
    call = call_msg["tool_calls"][0]
    assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
    if out["stop_reason"] == "length":   # an untrained model's expression string may run past the budget
        assert call["function"]["arguments"].startswith('{"name": "calculator", "arguments": {"expression": "')
        assert result["content"].startswith("error: the call was cut off")
    else:   # the tool really ran on the arguments the model wrote (often an error for random text)
        assert call["function"]["name"] == "calculator"
        assert result["content"] == _run({"calculator": calculator_tool()}, call, None)
    code = main(["generate", run, "--prompt", "What is 2*3?", "--tools", "calculator", "--tool-choice", "required",
                 "--max-steps", "1", "--temperature", "0", "--max-new-tokens", "200"])
    shown = capsys.readouterr().out
    assert code == 0 and re.search(r'^\[(calculator\(|\?\(\{"name": "calculator")', shown, re.M) and "\n[-> " in shown


def test_chat_with_tools_shows_calls_and_results(tool_run):
    import os
    import subprocess
    import sys

    run, idx = tool_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    r = subprocess.run([sys.executable, "-m", "gptstack.cli", "chat", run, "--tools", f"calculator,search:{idx}",
                        "--tool-choice", "search", "--max-steps", "2", "--max-new-tokens", "120", "--seed", "0"],
                       input="what is a zorblat\n/reset\nand again\n/quit\n", capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r'^\[(search\(|\?\(\{"name": "search")', r.stdout, re.M)) == 2, r.stdout
    assert "[conversation reset]" in r.stdout
    assert "[-> " in r.stdout


@pytest.mark.parametrize("extra, error", [
    (["--tools", "shell"], "unknown tool 'shell'"),
    (["--tool-choice", "required"], "--tool-choice needs --tools"),
    (["--tools", "calculator", "--tool-choice", "search"], "not among the tools"),
    (["--tools", "calculator", "--samples", "2"], "does not combine with --samples"),
    (["--tools", "calculator", "--max-steps", "0"], "--max-steps must be at least 1"),
])
def test_tool_flag_errors_are_one_line(tool_run, capsys, extra, error):
    from gptstack.cli import main

    run, _ = tool_run
    assert main(["generate", run, "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1
