"""Notes and activity logs -> conversations: a Logseq page with every construct, a Markdown file with headings,
plain text and an activity log written here; exact conversations, source pointers, each error, the CLI."""

import json

import pytest

from gptstack.errors import ConfigError, DataError
from gptstack.data.notes import parse_outline, read_notes, write_notes

LOGSEQ = """\
title:: Rust language
tags:: programming, [[systems languages]]
type:: language
id:: 6650f1a2-0000-4000-8000-000000000001

- Ownership - each value has exactly one owner #memory
  collapsed:: true
  id:: 6650f1a2-0000-4000-8000-000000000002
\t- When the owner goes out of scope, the value is dropped
\t- Borrowing lets code use a value without owning it, see [[Borrow checker]]
- Learning resources
\t- The [[Rust Book]] ![cover](../assets/book.png)
\t- Rustlings exercises #practice
\t- TODO finish chapter 10 of the book
\t  SCHEDULED: <2024-05-03 Fri>
\t- DONE install rustup
- lifetime:: how long a reference stays valid
- [[Cargo]] is the build tool #tools
  author:: the Rust team
- Buy a Rust t-shirt #todo
"""

MARKDOWN = """\
# Trip to Lisbon

Flights are booked
for June.

## Places
- Alfama
  - the old quarter, with fado bars
- Belém
* [ ] buy a travel adapter
* [x] renew passport

## Words
- **Obrigado**: thank you
- Bica - a short espresso
"""

TEXT = """\
Garden plans
Plant tomatoes in April
Water them every
morning before work.

TODO call the plumber

Compost - kitchen scraps turned into soil
"""

LOG = [
    '{"timestamp": "2024-05-01T09:00:00Z", "app": "Firefox", "url": "https://duckduckgo.com/?q=rust+lifetimes", '
    '"title": "rust lifetimes at DuckDuckGo"}',
    '{"timestamp": "2024-05-01T09:01:10Z", "app": "Firefox", "url": "https://doc.rust-lang.org/book/ch10.html", '
    '"title": "Validating References with Lifetimes", "note": "The book chapter explains it best."}',
    'this is not json',
    '{"timestamp": "2024-05-01T09:05:00Z", "app": "Obsidian", "title": "Rust.md", "text": "Lifetimes name borrows."}',
    '{"app": "Slack", "title": "general"}',
    '{"timestamp": 1714557600, "app": "Terminal", "action": "run", "title": "cargo build"}',
]


def qa(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture
def notes(tmp_path):
    tmp_path = tmp_path / "notes"
    (tmp_path / "graph" / "pages").mkdir(parents=True)
    (tmp_path / "graph" / "logseq" / "bak").mkdir(parents=True)
    (tmp_path / "graph" / "pages" / "Rust.md").write_text(LOGSEQ)
    (tmp_path / "graph" / "logseq" / "bak" / "Rust.md").write_text("- an app backup, never read\n")
    (tmp_path / "trip.md").write_text(MARKDOWN)
    (tmp_path / "ideas.txt").write_text(TEXT)
    (tmp_path / "log.jsonl").write_text("\n".join(LOG) + "\n")
    return tmp_path


def by_question(convs):
    return {c["messages"][0]["content"]: c for c in convs}


def test_logseq_page(notes):
    path = str(notes / "graph" / "pages" / "Rust.md")
    result = read_notes([path])
    assert result.files == {"logseq": 1} and not result.skipped
    convs = by_question(result.conversations)
    page_tags = ["programming", "systems languages"]
    c = convs["What are my notes on Rust language?"]   # title:: names the page
    assert c["messages"] == qa("What are my notes on Rust language?", "\n".join([
        "- Ownership - each value has exactly one owner",
        "  - When the owner goes out of scope, the value is dropped",
        "  - Borrowing lets code use a value without owning it, see Borrow checker",
        "- Learning resources",
        "  - The Rust Book",
        "  - Rustlings exercises",
        "  - TODO finish chapter 10 of the book (scheduled: 2024-05-03 Fri)",
        "  - DONE install rustup",
        "- lifetime: how long a reference stays valid",
        "- Cargo is the build tool (author: the Rust team)",
        "- TODO Buy a Rust t-shirt"]))
    assert c["kind"] == "outline" and c["tags"] == page_tags and c["source"] == {"path": path, "line": 6}
    c = convs["What is Ownership?"]   # "Term - definition"
    assert c["messages"][1]["content"] == "each value has exactly one owner"
    assert c["kind"] == "definition" and c["tags"] == ["memory"] + page_tags and c["source"]["line"] == 6
    assert convs["What are my notes on Ownership?"]["messages"][1]["content"] == (
        "- When the owner goes out of scope, the value is dropped\n"
        "- Borrowing lets code use a value without owning it, see Borrow checker")
    c = convs["What is lifetime?"]    # "term:: definition"
    assert c["messages"][1]["content"] == "how long a reference stays valid" and c["source"]["line"] == 17
    c = convs["What is the type of Rust language?"]   # a page property; id:: and title:: are not questions
    assert c["messages"][1]["content"] == "language" and c["kind"] == "property" and c["source"]["line"] == 3
    c = convs["What is the author of Cargo is the build tool?"]   # a block property
    assert c["messages"][1]["content"] == "the Rust team" and c["source"]["line"] == 19 and c["tags"][0] == "tools"
    c = convs["What is on my to-do list for Learning resources?"]
    assert c["messages"][1]["content"] == ("- TODO finish chapter 10 of the book (scheduled: 2024-05-03 Fri)\n"
                                           "- DONE install rustup")
    assert c["kind"] == "todo" and c["source"]["line"] == 14
    c = convs["What is on my to-do list for Rust language?"]   # #todo makes a task; the tag is not a word of it
    assert c["messages"][1]["content"] == "- TODO Buy a Rust t-shirt" and c["source"]["line"] == 20
    text = json.dumps(result.conversations)
    for gone in ("collapsed", "6650f1a2", "[[", "![", "book.png", "#"):
        assert gone not in text
    assert [c["source"]["line"] for c in result.conversations] == sorted(c["source"]["line"] for c in result.conversations)


def test_markdown_headings_checkboxes_and_bold_terms(notes):
    path = str(notes / "trip.md")
    result = read_notes([path])
    assert result.files == {"markdown": 1}
    convs = by_question(result.conversations)
    # one top heading: its question stands for the page (no separate "notes on trip")
    assert "What are my notes on trip?" not in convs
    c = convs["What are my notes on Trip to Lisbon?"]
    assert c["source"] == {"path": path, "line": 1}
    assert c["messages"][1]["content"] == ("- Flights are booked for June.\n- Places\n  - Alfama\n  - Belém\n"
                                           "  - TODO buy a travel adapter\n  - DONE renew passport\n- Words\n"
                                           "  - Obrigado: thank you\n  - Bica - a short espresso")
    assert convs["What are my notes on Places?"]["source"]["line"] == 6
    assert convs["What are my notes on Alfama?"]["messages"][1]["content"] == "- the old quarter, with fado bars"
    assert convs["What is on my to-do list for Places?"]["messages"][1]["content"] == (
        "- TODO buy a travel adapter\n- DONE renew passport")
    assert convs["What is Obrigado?"]["messages"][1]["content"] == "thank you"
    assert convs["What is Bica?"]["messages"][1]["content"] == "a short espresso"
    assert convs["What is Bica?"]["source"]["line"] == 15
    assert len(result.conversations) == 7


def test_plain_text(notes):
    path = str(notes / "ideas.txt")
    convs = by_question(read_notes([path]).conversations)
    assert convs["What are my notes on Garden plans?"]["messages"] == qa(
        "What are my notes on Garden plans?", "- Plant tomatoes in April\n- Water them every morning before work.")
    assert convs["What are my notes on ideas?"]["source"] == {"path": path, "line": 1}
    assert convs["What is on my to-do list for ideas?"]["messages"][1]["content"] == "- TODO call the plumber"
    assert convs["What is on my to-do list for ideas?"]["source"]["line"] == 6
    assert convs["What is Compost?"]["messages"][1]["content"] == "kitchen scraps turned into soil"
    assert convs["What is Compost?"]["source"]["line"] == 8


def test_activity_log_becomes_tool_call_trajectories(notes):
    path = str(notes / "log.jsonl")
    result = read_notes([path], skip_bad=True)
    assert result.skipped == [(f"{path}:3", "not JSON"), (f"{path}:5", "no timestamp")]
    first, second = result.conversations   # 09:05 -> 10:00 is a gap over 30 minutes: two sessions

    def call(i, name, args):
        return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}

    assert first["messages"] == [
        {"role": "user", "content": "Find information about rust lifetimes."},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "search", {"query": "rust lifetimes"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rust lifetimes at DuckDuckGo"},
        {"role": "assistant", "content": "The book chapter explains it best.",
         "tool_calls": [call(2, "open_url", {"url": "https://doc.rust-lang.org/book/ch10.html"})]},
        {"role": "tool", "tool_call_id": "call_2", "content": "Validating References with Lifetimes"},
        {"role": "assistant", "content": "", "tool_calls": [call(3, "use_app", {"name": "Obsidian", "window": "Rust.md"}),
                                                            call(4, "type_text", {"text": "Lifetimes name borrows."})]},
        {"role": "tool", "tool_call_id": "call_3", "content": "Rust.md"},
        {"role": "tool", "tool_call_id": "call_4", "content": "typed into Obsidian"},
        {"role": "assistant", "content": "Done: searched for 'rust lifetimes'; opened "
                                         "https://doc.rust-lang.org/book/ch10.html; used Obsidian; typed the text."},
    ]
    assert first["kind"] == "activity"
    assert first["source"] == {"path": path, "line": 1, "end_line": 4, "events": 3,
                               "start": "2024-05-01T09:00:00+00:00", "end": "2024-05-01T09:05:00+00:00"}
    assert [t["function"]["name"] for t in first["tools"]] == ["search", "open_url", "use_app", "type_text"]
    assert second["messages"][0] == {"role": "user", "content": "Run cargo build."}   # epoch seconds read as UTC
    assert second["source"]["line"] == 6 and second["source"]["start"] == "2024-05-01T10:00:00+00:00"
    assert second["messages"][1]["tool_calls"][1]["function"] == {
        "name": "perform_action", "arguments": json.dumps({"action": "run", "target": "cargo build"})}


def test_sessions_repeats_goal_and_step_limit(tmp_path):
    log = tmp_path / "a.jsonl"
    events = [{"timestamp": 1000 + i, "app": "Editor", "title": f"file{i // 2}.py"} for i in range(6)]
    events.append({"timestamp": "2024-01-01T00:00:00", "session": 7, "goal": "Plan the week", "app": "Calendar"})
    log.write_text("\n".join(map(json.dumps, events)) + "\n")
    convs = read_notes([log], max_steps=2).conversations
    # repeated windows collapse; 3 distinct windows at most 2 calls each -> 2 trajectories, then the new session
    assert [[m["tool_calls"][0]["function"]["arguments"] for m in c["messages"] if "tool_calls" in m]
            for c in convs[:2]] == [['{"name": "Editor", "window": "file0.py"}', '{"name": "Editor", "window": "file1.py"}'],
                                    ['{"name": "Editor", "window": "file2.py"}']]
    assert convs[2]["messages"][0]["content"] == "Plan the week" and convs[2]["source"]["line"] == 7
    assert convs[0]["source"]["events"] == 4 and convs[1]["source"]["line"] == 5


def test_errors_are_line_numbered(notes, tmp_path):
    log = str(notes / "log.jsonl")
    with pytest.raises(DataError, match=f"^{log}:3: not valid JSON \\(Expecting value at column 1\\)$"):
        read_notes([log])
    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ('{"app": "Slack"}', "event has no 'timestamp' (ISO 8601 or epoch seconds)"),
        ('{"timestamp": "yesterday", "app": "x"}', "timestamp 'yesterday' is not ISO 8601 or epoch seconds"),
        ('[1, 2]', "an event must be a JSON object, got list"),
        ('{"timestamp": 5, "url": 5}', "'url' must be a string, got int"),
        ('{"timestamp": 5, "mouse": [1, 2]}', "event has none of app, title, url, text, action, query or note"),
    ]:
        bad.write_text('{"timestamp": 1, "app": "ok"}\n\n' + line + "\n")
        with pytest.raises(DataError) as e:
            read_notes([bad])
        assert str(e.value) == f"{bad}:3: {message}"
    with pytest.raises(DataError, match=r"^cannot read '.*missing.md' \(No such file or directory\)$"):
        read_notes([tmp_path / "missing.md"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text"):
        read_notes([tmp_path / "latin1.txt"])
    (tmp_path / "code.md").write_text("- a\n```\nx = 1\n")
    with pytest.raises(DataError, match=r"code.md:2: code block opened with ``` is never closed$"):
        read_notes([tmp_path / "code.md"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no notes files"):
        read_notes([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="unknown notes format 'org'"):
        read_notes([log], fmt="org")


def test_skip_bad_counts_every_skip(notes, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = read_notes([notes / "log.jsonl", tmp_path / "latin1.txt", tmp_path / "missing.md"], skip_bad=True)
    assert [r for _, r in result.skipped] == ["not JSON", "no timestamp", "unreadable file", "unreadable file"]
    assert result.files == {"activity": 1} and len(result.conversations) == 2


def test_code_blocks_and_front_matter(tmp_path):
    p = tmp_path / "snippets.md"
    p.write_text("---\ntitle: Shell snippets\nlevel: beginner\n---\n# Shell\n- find big files\n  ```\n"
                 "  # biggest last\n  du -sh * | sort -h\n  ```\n")
    page = parse_outline(p.read_text(), p)
    assert page.title == "Shell snippets"
    convs = by_question(read_notes([p]).conversations)
    assert convs["What is the level of Shell snippets?"]["messages"][1]["content"] == "beginner"
    assert convs["What are my notes on find big files?"]["messages"][1]["content"] == \
        "- ```\n  # biggest last\n  du -sh * | sort -h\n  ```"   # code is kept as written, # and * included


def test_outline_conversations_load_and_render_through_the_sft_loader(notes, tmp_path, tiny_tokenizer):
    from gptstack.data.chat import load_conversations

    out = tmp_path / "out" / "notes.jsonl"
    result = write_notes([notes / "graph", notes / "trip.md", notes / "ideas.txt"], out)
    assert result.files == {"logseq": 1, "markdown": 1, "text": 1}   # the logseq/ app folder is not read
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rows == result.conversations and all(r["source"]["line"] >= 1 for r in rows)
    convs = load_conversations(str(out))
    assert len(convs) == len(rows)
    for messages in convs:
        ids, mask = tiny_tokenizer.render_conversation(messages)
        assert len(ids) == len(mask) and sum(mask) > 0


def test_write_is_atomic_and_refuses_nothing_or_its_inputs(notes, tmp_path):
    out = tmp_path / "keep.jsonl"
    out.write_text("old\n")
    (tmp_path / "blank.md").write_text("\n\n")
    with pytest.raises(DataError, match="no conversations from .*blank.md; .*keep.jsonl was not written"):
        write_notes([tmp_path / "blank.md"], out)
    assert out.read_text() == "old\n"
    with pytest.raises(DataError):
        write_notes([notes / "log.jsonl"], out)
    assert out.read_text() == "old\n" and not (tmp_path / "keep.jsonl.tmp").exists()
    with pytest.raises(ConfigError, match="is among the notes being read"):
        write_notes([notes], notes / "notes.jsonl")


def test_cli(notes, tmp_path, capsys):
    from gptstack.cli import main

    out = tmp_path / "n.jsonl"
    assert main(["data", "notes", str(notes), "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "read 4 files (1 activity, 1 logseq, 1 markdown, 1 text)"
    assert printed[1].startswith(f"wrote {len(out.read_text().splitlines())} conversations (") and str(out) in printed[1]
    assert printed[2] == f"skipped 2: 1 not JSON ({notes}/log.jsonl:3); 1 no timestamp ({notes}/log.jsonl:5)"
    assert main(["data", "notes", str(notes / "log.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"gptstack data: error: {notes}/log.jsonl:3: not valid JSON " \
                                              "(Expecting value at column 1)"
    assert not (tmp_path / "x.jsonl").exists()


def test_link_markup_tasks_and_more_event_shapes(tmp_path):
    page = tmp_path / "a%2Fb.md"
    page.write_text("alias:: AB\n- ## Links\n"
                    "\t- See [[Page|the alias]] and [label]([[Other]]) and [site](https://x.org)\n"
                    "\t- Tagged #[[two words]] inline ((6650f1a2-0000-4000-8000-000000000002)) {{embed [[x]]}} "
                    "![[pic.png]]\n"
                    "\t- LATER [#A] write the report\n\t  DEADLINE: <2024-06-01 Sat>\n"
                    "\t- C# and page#anchor stay #lang #[[big data]]\n")
    log = tmp_path / "b.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in [
        {"ts": "1714557600000", "app": "Chrome", "action": "search", "query": "fado bars", "content": "Top 10"},
        {"time": 1714557660, "note": "The second one looks good."},
        {"time": 1714557670, "app": "Chrome", "action": "click", "title": "Book a table", "content": "Booked"},
        {"time": 1714600000, "note": "just thinking"}]) + "\n")
    result = read_notes([tmp_path])
    links, todo, trip = result.conversations
    assert links["messages"] == qa("What are my notes on Links?", "- See the alias and label and site\n"
                                   "- Tagged two words inline\n- LATER write the report (deadline: 2024-06-01 Sat)\n"
                                   "- C# and page#anchor stay")
    assert links["source"]["line"] == 2 and todo["kind"] == "todo"
    assert [m.get("content") for m in trip["messages"]] == [
        "Find information about fado bars.", "", "Top 10", "The second one looks good.", "Booked",
        "Done: searched for 'fado bars'; click Book a table."]
    assert trip["messages"][3]["tool_calls"][0]["function"]["arguments"] == '{"action": "click", "target": "Book a table"}'
    assert trip["source"]["start"] == "2024-05-01T10:00:00+00:00"   # epoch milliseconds as a digit string
    assert trip["tools"][1]["function"]["parameters"]["required"] == ["action"]
    assert result.skipped == [(f"{log}:4", "session with no actions")]   # reported, not dropped
