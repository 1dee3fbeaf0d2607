"""Your own notes and activity logs as training conversations (`gptstack data notes`; docs/notes.md).

Outlines (Markdown, Logseq pages, plain text) become question/answer pairs that follow their structure: a
heading or parent bullet and its children ("What are my notes on X?"), a term and its definition ("What is
X?"), a property of a page or block, and the open and done tasks under a parent. Activity logs (JSONL, one
timestamped event a line) become agent trajectories in OpenAI's tool-call format: a session of consecutive
events is a user goal, then the searches, pages, apps and typing in time order as assistant tool calls with
their results as `tool` messages, and the note text written along the way as the assistant's content.

Every conversation keeps `source` ({"path", "line"}, for logs also the event range). Bad input (an
unreadable file, a log line that is not JSON, an event without a timestamp) is a DataError naming FILE:LINE,
or with `skip_bad` a counted skip with its reason; nothing is dropped without being reported.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, DataError

FORMATS = ("auto", "markdown", "logseq", "text", "activity")
SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text",
            ".jsonl": "activity", ".ndjson": "activity"}
DROPPED_PROPS = {"collapsed", "id", "heading", "filters"}   # Logseq's own display state, not knowledge
PAGE_META = {"title", "tags", "alias"}                      # page metadata, not questions
TODO_STATES = ("TODO", "DOING", "NOW", "LATER", "WAITING", "WAIT", "DONE", "CANCELED", "CANCELLED")
TODO_TAGS = {"todo", "task"}
ANSWER_DEPTH = 2   # levels of a subtree an outline answer shows (deeper parents get their own question)

_BULLET = re.compile(r"^(\s*)(?:[-*+•]|\d+[.)])(?:\s+(.*))?$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_PROP = re.compile(r"^([^\s:#-][^:]{0,59}?)::(?:\s+(.*))?$")
_PLANNING = re.compile(r"^(SCHEDULED|DEADLINE):\s*(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_TODO = re.compile(r"^(%s)\b\s*(?:\[#([A-C])\]\s*)?" % "|".join(TODO_STATES))
_CHECKBOX = re.compile(r"^\[([ xX])\]\s+")
_DASH_DEF = re.compile(r"^(?P<term>\S.{0,58}?)\s+[-–—]\s+(?P<def>\S.*)$")
_BOLD_DEF = re.compile(r"^\*\*(?P<term>[^*]{1,60})\*\*\s*(?::|[-–—])\s*(?P<def>\S.*)$")
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)|!\[\[[^\]]*\]\]")
_MD_LINK = re.compile(r"\[([^\]]+)\]\((?:\[\[)?[^)]*?(?:\]\])?\)")
_TAG_LINK = re.compile(r"(?<!\S)#\[\[([^\]]+)\]\]")
_WIKI = re.compile(r"\[\[([^\]|]+)(?:\|([^\]]+))?\]\]")
_TAG = re.compile(r"(?<![\w#/&])#([^\s#\[\](),.;:!?\"']+)")
_BLOCK_REF = re.compile(r"\(\([0-9a-fA-F-]{8,}\)\)|\{\{[^}]*\}\}")
_SEARCH_HOSTS = re.compile(r"(^|\.)(google|bing|duckduckgo|search\.brave|kagi|startpage|ecosia|baidu|yandex)\.")


# ---- outlines -----------------------------------------------------------------------------------------
@dataclass
class Node:
    text: str
    line: int
    children: list = field(default_factory=list)
    props: dict = field(default_factory=dict)       # key -> (value, line)
    tags: list = field(default_factory=list)
    todo: str = ""                                  # TODO, DONE, ... ("" when not a task)
    term: str = ""                                  # "Term - definition": the term ...
    definition: str = ""                            # ... and the definition
    heading: int = 0
    code: bool = False                              # fenced code: kept as written


@dataclass
class Page:
    path: str
    title: str
    root: Node
    props: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)
    journal: bool = False


def clean(text: str) -> tuple[str, list[str]]:
    """Outline markup -> plain text and its tags: links become their names, images, block refs and macros
    go, trailing #tags (and every #todo) are removed and inline ones read as words."""
    tags: list[str] = []

    def tag(name: str) -> str:
        if name.lower() not in [t.lower() for t in tags]:
            tags.append(name)
        return "" if name.lower() in TODO_TAGS else name   # #todo marks a task; it is not a word of it

    text = _BLOCK_REF.sub("", _IMAGE.sub("", text))
    text = _MD_LINK.sub(lambda m: m.group(1), text)
    text = _TAG_LINK.sub(lambda m: "#" + m.group(1).replace(" ", "\0"), text)
    text = _WIKI.sub(lambda m: m.group(2) or m.group(1), text)
    words = text.split()
    while words and _TAG.fullmatch(words[-1]):   # trailing tags are labels, not part of the sentence
        tag(words.pop()[1:].replace("\0", " "))
    text = " ".join(words)
    text = _TAG.sub(lambda m: tag(m.group(1).replace("\0", " ")), text).replace("\0", " ")
    text = re.sub(r"\*\*([^*]+)\*\*|__([^_]+)__", lambda m: m.group(1) or m.group(2), text)
    text = re.sub(r"<(\d{4}-\d{2}-\d{2}[^>]*)>", r"\1", text)   # Logseq dates <2024-05-01 Wed>
    return re.sub(r"[ \t]+", " ", text).strip(), tags


def _title(path: Path) -> tuple[str, bool]:
    stem = urllib.parse.unquote(path.stem).replace("___", "/")
    if re.fullmatch(r"\d{4}_\d{2}_\d{2}", stem):   # a Logseq journal: 2024_05_01.md
        return stem.replace("_", "-"), True
    return stem, False


def parse_outline(text: str, path: str | Path) -> Page:
    """A Markdown or Logseq page -> its tree: headings nest by level, bullets by indentation, paragraphs
    and fenced code sit under the heading above them; `key:: value` lines at the top are page properties,
    under a bullet they are the bullet's."""
    path = Path(path)
    title, journal = _title(path)
    root = Node("", 0)
    page = Page(str(path), title, root, journal=journal)
    headings: list[tuple[int, Node]] = []
    bullets: list[tuple[int, Node]] = []
    block: Node | None = None          # where continuation and property lines go
    block_indent = -1
    para: Node | None = None
    fence: list | None = None          # the lines of an open ``` block ...
    fence_node, fence_indent = Node("", 0), 0   # ... the node they go to, and the fence's indentation
    started = False
    lines = text.splitlines()
    start = 0
    if lines and lines[0].strip() == "---":   # YAML front matter: `key: value` lines as page properties
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                for j in range(1, i):
                    k, sep, v = lines[j].partition(":")
                    if sep and k.strip() and not k.startswith((" ", "-")):
                        page.props[k.strip()] = (v.strip().strip("[]"), j + 1)
                start = i + 1
                break

    def container() -> Node:
        return headings[-1][1] if headings else root

    for lineno, raw in enumerate(lines[start:], start + 1):
        line = raw.expandtabs(4)
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if fence is not None:
            if _FENCE.match(line):
                fence_node.text = "\n".join(fence)
                fence = None
            else:
                fence.append(line[min(fence_indent, indent):] if stripped else "")
            continue
        if not stripped:
            para = None
            continue
        if _FENCE.match(line):
            fence, fence_indent = [], indent
            fence_node = Node("", lineno, code=True)
            (block if block is not None and indent > block_indent else container()).children.append(fence_node)
            para = None
            started = True
            continue
        prop = _PROP.match(stripped) or _PLANNING.match(stripped)
        if prop and not started and not _BULLET.match(line):
            page.props[prop.group(1)] = ((prop.group(2) or "").strip(), lineno)
            continue
        started = True
        heading = _HEADING.match(line)
        bullet = _BULLET.match(line)
        if heading:
            level = len(heading.group(1))
            while headings and headings[-1][0] >= level:
                headings.pop()
            node = Node(heading.group(2), lineno, heading=level)
            container().children.append(node)
            headings.append((level, node))
            bullets, block, block_indent, para = [], node, indent, None
        elif bullet:
            while bullets and bullets[-1][0] >= indent:
                bullets.pop()
            parent = bullets[-1][1] if bullets else container()
            node = Node("", lineno)
            parent.children.append(node)
            bullets.append((indent, node))
            block, block_indent, para = node, indent, None
            body = (bullet.group(2) or "").strip()
            prop = _PROP.match(body)
            if prop:
                node.props[prop.group(1)] = ((prop.group(2) or "").strip(), lineno)
            else:
                node.text = body
        elif block is not None and bullets and indent > block_indent:   # under a bullet: its property or text
            if prop:
                block.props[prop.group(1).lower() if _PLANNING.match(stripped) else prop.group(1)] = \
                    ((prop.group(2) or "").strip(), lineno)
            else:
                block.text = (block.text + " " + stripped).strip()
        elif re.fullmatch(r"(-{3,}|\*{3,}|_{3,})", stripped):
            para = None   # a horizontal rule
        elif _PROP.match(stripped):   # a `term:: definition` line of its own
            bullets, para = [], None
            node = Node("", lineno, props={prop.group(1): ((prop.group(2) or "").strip(), lineno)})
            container().children.append(node)
            block, block_indent = node, indent
        elif para is not None:
            para.text += " " + stripped.lstrip("> ")
        else:
            bullets = []
            para = Node(stripped.lstrip("> "), lineno)
            container().children.append(para)
            block, block_indent = para, indent
    if fence is not None:
        raise DataError(f"{path}:{fence_node.line}: code block opened with ``` is never closed")
    _finish_page(page)
    return page


def parse_text(text: str, path: str | Path) -> Page:
    """Plain text: paragraphs split by blank lines. A paragraph whose first line reads like a title (a few
    words, no closing punctuation) becomes a parent of its other lines; a line that goes on with a lowercase
    word continues the sentence above it."""
    path = Path(path)
    title, _ = _title(path)
    root = Node("", 0)
    paragraph: list[tuple[int, str]] = []

    def flush():
        merged: list[list] = []
        for lineno, s in paragraph:
            bullet = _BULLET.match(s)
            s = (bullet.group(2) or "").strip() if bullet else s
            if merged and not bullet and s[:1].islower() and not merged[-1][1].endswith((".", "!", "?", ":", ";")):
                merged[-1][1] += " " + s
            else:
                merged.append([lineno, s])
        first = merged[0][1].rstrip(":")
        if len(merged) > 1 and len(first.split()) <= 8 and not first.endswith((".", "!", "?", ",", ";")) \
                and not _TODO.match(first):
            root.children.append(Node(first, merged[0][0], [Node(s, n) for n, s in merged[1:]]))
        else:
            root.children.extend(Node(s, n) for n, s in merged)
        paragraph.clear()

    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            paragraph.append((lineno, line.strip()))
        elif paragraph:
            flush()
    if paragraph:
        flush()
    page = Page(str(path), title, root)
    _finish_page(page)
    return page


def _finish_page(page: Page) -> None:
    props = {}
    for key, (value, line) in page.props.items():
        if key.lower() == "title" and value:
            page.title = clean(value)[0]
        elif key.lower() in ("tags", "alias"):
            if key.lower() == "tags":
                for t in value.split(","):
                    name = clean(t.strip().lstrip("#"))[0]
                    if name and name not in page.tags:
                        page.tags.append(name)
        elif key.lower() not in DROPPED_PROPS:
            props[key] = (clean(value)[0], line)
    page.props = props
    page.root.children = _finish(page.root.children)


def _finish(nodes: list[Node]) -> list[Node]:
    """Markup -> text, tags, task state and definitions; empty bullets go (their children move up)."""
    out = []
    for n in nodes:
        n.children = _finish(n.children)
        n.props = {k: (clean(v)[0], line) for k, (v, line) in n.props.items() if k.lower() not in DROPPED_PROPS}
        raw = n.text
        if n.code:
            if raw.strip():
                out.append(n)
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", raw)   # a Logseq heading block: "- ## Title"
        if heading:
            n.heading, raw = len(heading.group(1)), heading.group(2)
        todo, box = _TODO.match(raw), _CHECKBOX.match(raw)
        if todo:
            n.todo, raw = todo.group(1), raw[todo.end():]
        elif box:
            n.todo, raw = ("TODO" if box.group(1) == " " else "DONE"), raw[box.end():]
        if not n.todo and not n.heading:
            d = _BOLD_DEF.match(raw) or _DASH_DEF.match(raw)
            if d:
                term, definition = clean(d.group("term"))[0], clean(d.group("def"))[0]
                if term and definition and len(term.split()) <= 6 and not term.endswith((".", "?", "!", ",", ";", ":")):
                    n.term, n.definition = term, definition
        n.text, n.tags = clean(raw)
        if any(t.lower() in TODO_TAGS for t in n.tags):
            n.todo = n.todo or "TODO"
            n.tags = [t for t in n.tags if t.lower() not in TODO_TAGS]
        if not n.text and n.tags and not n.props:
            n.text = " ".join(n.tags)   # a block of tags only names its topic
        if not n.text and not n.props:
            out.extend(n.children)
        else:
            out.append(n)
    return out


def _label(n: Node) -> str:
    if n.code:
        return f"```\n{n.text}\n```"
    props = ", ".join(f"{k}: {v}" for k, (v, _) in n.props.items())
    if not n.text:
        return props
    text = (f"{n.todo} " if n.todo else "") + n.text
    return text + (f" ({props})" if props else "")


def render(nodes: list[Node], depth: int = ANSWER_DEPTH, indent: int = 0) -> list[str]:
    """A subtree as a nested bullet list, `depth` levels deep."""
    lines = []
    for n in nodes:
        pad = "  " * indent
        first, *rest = _label(n).split("\n")
        lines.append(f"{pad}- {first}")
        lines.extend(f"{pad}  {r}" for r in rest)
        if depth > 1:
            lines.extend(render(n.children, depth - 1, indent + 1))
    return lines


def _qa(question: str, answer: str, kind: str, page: Page, line: int, tags: list[str]) -> dict:
    conv = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "kind": kind}
    all_tags = list(dict.fromkeys(tags + page.tags))
    if all_tags:
        conv["tags"] = all_tags
    conv["source"] = {"path": page.path, "line": line}
    return conv


def _words(key: str) -> str:
    return key.replace("-", " ").replace("_", " ")


def page_conversations(page: Page) -> list[dict]:
    """The question/answer pairs of one page, in the order of its lines."""
    convs: list[dict] = []
    top = page.root.children
    for key, (value, line) in page.props.items():
        if value:
            convs.append(_qa(f"What is the {_words(key)} of {page.title}?", value, "property", page, line, []))
    if top and not (len(top) == 1 and top[0].heading):   # a page that is one heading: that heading's question
        q = f"What did I note on {page.title}?" if page.journal else f"What are my notes on {page.title}?"
        convs.append(_qa(q, "\n".join(render(top)), "outline", page, top[0].line, []))
    _todo_conversations(page.root, page.title, page, convs)

    def walk(nodes: list[Node]) -> None:
        for n in nodes:
            topic = n.term or n.text.split("\n")[0]
            if n.children and not n.todo and topic:
                convs.append(_qa(f"What are my notes on {topic}?", "\n".join(render(n.children)), "outline",
                                 page, n.line, n.tags))
            if n.term:
                convs.append(_qa(f"What is {n.term}?", n.definition, "definition", page, n.line, n.tags))
            if not n.todo:
                for key, (value, line) in n.props.items():
                    if not value:
                        continue
                    if n.text:
                        convs.append(_qa(f"What is the {_words(key)} of {n.text}?", value, "property", page,
                                         line, n.tags))
                    else:
                        convs.append(_qa(f"What is {key}?", value, "definition", page, line, n.tags))
            if n.children:
                _todo_conversations(n, topic, page, convs)
            walk(n.children)

    walk(top)
    convs.sort(key=lambda c: c["source"]["line"])   # stable: a line's own questions keep their order
    return convs


def _todo_conversations(parent: Node, topic: str, page: Page, convs: list[dict]) -> None:
    todos = [n for n in parent.children if n.todo]
    if todos and topic:
        convs.append(_qa(f"What is on my to-do list for {topic}?", "\n".join(render(todos)), "todo", page,
                         todos[0].line, list(dict.fromkeys(t for n in todos for t in n.tags))))


# ---- activity logs ------------------------------------------------------------------------------------
EVENT_FIELDS = ("app", "title", "url", "text", "action", "query", "note", "content", "goal", "session")
TIME_FIELDS = ("timestamp", "ts", "time")
TYPING = {"", "type", "typing", "input", "keyboard", "write"}
NAVIGATION = {"open", "visit", "navigate", "focus", "switch", "activate", "view", "read"}


def _tool(tool: str, description: str, **params: str) -> dict:
    required = [k for k in params if not params[k].startswith("(optional)")]
    return {"type": "function", "function": {"name": tool, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": "string", "description": v.removeprefix("(optional) ")}
                                        for k, v in params.items()},
        "required": required}}}


ACTIVITY_TOOLS = {
    "search": _tool("search", "Search the web.", query="what to search for"),
    "open_url": _tool("open_url", "Open a web page.", url="the address"),
    "use_app": _tool("use_app", "Switch to an application (and one of its windows).", name="the application",
                     window="(optional) the window title"),
    "type_text": _tool("type_text", "Type text into the active application.", text="the text to type"),
    "perform_action": _tool("perform_action", "Do an action in the active application (click, copy, save, ...).",
                            action="the action", target="(optional) what it acts on"),
}


@dataclass
class Event:
    time: datetime
    line: int
    fields: dict


def parse_timestamp(value) -> datetime:
    """ISO 8601 (times without an offset are UTC) or epoch seconds (milliseconds when over 1e11)."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        value = float(value)
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000 if value > 1e11 else value, timezone.utc)
        if isinstance(value, str):
            t = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        pass
    raise ValueError


def _event(row, where: str) -> Event:
    """One log line's value -> an Event; DataError(reason) naming `where` when it cannot be one."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: an event must be a JSON object, got {type(row).__name__}")
    key = next((k for k in TIME_FIELDS if k in row), None)
    if key is None:
        raise DataError(f"{where}: event has no 'timestamp' (ISO 8601 or epoch seconds)")
    try:
        t = parse_timestamp(row[key])
    except ValueError:
        raise DataError(f"{where}: timestamp {row[key]!r} is not ISO 8601 or epoch seconds") from None
    fields = {}
    for f in EVENT_FIELDS:
        v = row.get(f)
        if v is None or v == "":
            continue
        if f == "session" and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise DataError(f"{where}: '{f}' must be a string, got {type(v).__name__}")
        fields[f] = v.strip() if f != "text" else v
    if not any(f in fields for f in ("app", "title", "url", "text", "action", "query", "note")):
        raise DataError(f"{where}: event has none of app, title, url, text, action, query or note")
    return Event(t, 0, fields)


def read_activity(text: str, path: str, skip_bad: bool, skipped: list) -> list[Event]:
    events = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            ev = _event(row, where)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append((where, _reason(str(e))))
            continue
        ev.line = lineno
        events.append(ev)
    events.sort(key=lambda e: e.time)   # stable: events at the same moment keep their order
    return events


def _reason(message: str) -> str:
    for words, reason in (("not valid JSON", "not JSON"), ("no 'timestamp'", "no timestamp"),
                          ("is not ISO 8601", "bad timestamp"), ("must be a JSON object", "not an object"),
                          ("must be a string", "bad field"), ("has none of", "empty event")):
        if words in message:
            return reason
    return message.split(": ", 1)[-1]


def _search_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if _SEARCH_HOSTS.search(parts.netloc.lower()) and parts.path.rstrip("/") in ("/search", "", "/html", "/s", "/web"):
        q = urllib.parse.parse_qs(parts.query).get("q") or urllib.parse.parse_qs(parts.query).get("wd")
        return q[0].strip() if q else ""
    return ""


def _calls(ev: Event, state: dict) -> list[tuple[str, dict, str]]:
    """(tool, arguments, result) for what one event did, given what was open before it; an event that
    repeats the state (the same window again) does nothing."""
    f, calls = ev.fields, []
    action = f.get("action", "").lower()
    query = f.get("query") or (f.get("text") if action == "search" else "") or _search_query(f.get("url", ""))
    seen = f.get("content") or f.get("title", "")
    acts = bool(f.get("text") and action in TYPING) or action not in TYPING | NAVIGATION | {"search"}
    if query:
        calls.append(("search", {"query": query}, seen or f"results for {query}"))
    elif f.get("url") and f["url"] != state.get("url"):
        calls.append(("open_url", {"url": f["url"]}, seen or f["url"]))
    elif (f.get("app") and f["app"] != state.get("app")) or (not acts and (f.get("app") or f.get("title"))
                                                             and f.get("title") != state.get("title")):
        args = {"name": f.get("app") or state.get("app") or f["title"]}
        if f.get("title") and f.get("title") != args["name"]:
            args["window"] = f["title"]
        calls.append(("use_app", args, (seen if not acts else f.get("title")) or f"{args['name']} is open"))
    if f.get("text") and action in TYPING:
        calls.append(("type_text", {"text": f["text"]}, f"typed into {f['app']}" if f.get("app") else "typed"))
    elif action and action not in TYPING | NAVIGATION | {"search"}:
        args = {"action": action}
        if f.get("title") or f.get("app"):
            args["target"] = f.get("title") or f["app"]
        calls.append(("perform_action", args, f.get("content") or "done"))
    for k in ("app", "title", "url"):
        if k in f:
            state[k] = f[k]
    if query or f.get("url"):
        state["url"] = f.get("url", "")
    return calls


def _goal(first: tuple[str, dict, str], ev: Event) -> str:
    name, args, _ = first
    title = ev.fields.get("title")
    if name == "search":
        return f"Find information about {args['query']}."
    if name == "open_url":
        return f"Open {title or args['url']}."
    if name == "type_text":
        return f"Write this in {ev.fields['app']}: {args['text']}" if ev.fields.get("app") else f"Type: {args['text']}"
    if name == "perform_action":
        return f"{args['action'].capitalize()} {args.get('target', '')}".strip() + "."
    return f"Work in {args['name']}" + (f" on {args['window']}." if args.get("window") else ".")


def _step(name: str, args: dict) -> str:
    return {"search": lambda: f"searched for {args.get('query')!r}", "open_url": lambda: f"opened {args.get('url')}",
            "type_text": lambda: "typed the text", "use_app": lambda: f"used {args.get('name')}",
            "perform_action": lambda: f"{args.get('action')} {args.get('target', '')}".strip()
            }[name]()


def activity_conversations(events: list[Event], path: str, session_gap: float = 1800.0, max_steps: int = 32,
                           skipped: list | None = None) -> list[dict]:
    """Sessions (split at a gap over `session_gap` seconds or a change of the `session` field) -> one
    trajectory each, at most `max_steps` tool calls (a longer session goes on in the next conversation)."""
    sessions: list[list[Event]] = []
    for ev in events:
        if not sessions or (ev.time - sessions[-1][-1].time).total_seconds() > session_gap \
                or ev.fields.get("session") != sessions[-1][-1].fields.get("session"):
            sessions.append([])
        sessions[-1].append(ev)
    convs = []
    for session in sessions:
        state: dict = {}
        chunk: list[tuple[Event, list]] = []
        n_calls = 0
        for ev in session:
            calls = _calls(ev, state)
            if chunk and n_calls + len(calls) > max_steps and n_calls:
                convs.append(_trajectory(chunk, path, skipped))
                chunk, n_calls = [], 0
            chunk.append((ev, calls))
            n_calls += len(calls)
        if chunk:
            conv = _trajectory(chunk, path, skipped)
            if conv:
                convs.append(conv)
    return [c for c in convs if c]


def _trajectory(chunk: list[tuple[Event, list]], path: str, skipped: list | None) -> dict | None:
    evs = [ev for ev, _ in chunk]
    source = {"path": path, "line": evs[0].line, "end_line": evs[-1].line, "events": len(evs),
              "start": evs[0].time.isoformat(), "end": evs[-1].time.isoformat()}
    if not any(calls for _, calls in chunk):
        if skipped is not None:
            lines = f"{evs[0].line}-{evs[-1].line}" if len(evs) > 1 else str(evs[0].line)
            skipped.append((f"{path}:{lines}", "session with no actions"))
        return None
    (first_ev, first_calls) = next((ev, calls) for ev, calls in chunk if calls)
    first = next((c for c in first_calls if c[0] != "use_app"), first_calls[0])   # what the event was for
    goal = next((ev.fields["goal"] for ev in evs if ev.fields.get("goal")), None) or _goal(first, first_ev)
    messages = [{"role": "user", "content": goal}]
    notes: list[str] = []
    steps, used, n = [], [], 0
    for ev, calls in chunk:
        if ev.fields.get("note"):
            notes.append(ev.fields["note"])
        if not calls:
            continue
        tool_calls, results = [], []
        for name, args, result in calls:
            n += 1
            tool_calls.append({"id": f"call_{n}", "type": "function",
                               "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
            results.append({"role": "tool", "tool_call_id": f"call_{n}", "content": result})
            steps.append(_step(name, args))
            if name not in used:
                used.append(name)
        messages.append({"role": "assistant", "content": "\n".join(notes), "tool_calls": tool_calls})
        messages.extend(results)
        notes = []
    messages.append({"role": "assistant", "content": "\n".join(notes + ["Done: " + "; ".join(steps) + "."])})
    return {"messages": messages, "tools": [ACTIVITY_TOOLS[k] for k in ACTIVITY_TOOLS if k in used],
            "kind": "activity", "source": source}


# ---- files -> conversations -> JSONL ------------------------------------------------------------------
@dataclass
class NotesResult:
    conversations: list = field(default_factory=list)
    files: dict = field(default_factory=dict)        # format -> files read
    skipped: list = field(default_factory=list)      # (where, reason)

    def kinds(self) -> dict:
        out: dict = {}
        for c in self.conversations:
            out[c["kind"]] = out.get(c["kind"], 0) + 1
        return out


def _files(spec: str) -> list[Path]:
    path = Path(spec)
    if not path.is_dir():
        return [path]
    found = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in SUFFIXES
             and not any(part.startswith(".") or part == "logseq" for part in p.relative_to(path).parts[:-1])
             and not p.name.startswith(".")]
    if not found:
        raise DataError(f"'{spec}' holds no notes files ({', '.join(SUFFIXES)})")
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (notes must be UTF-8)") from None
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({e.strerror})") from None


def detect_format(path: Path, text: str) -> str:
    fmt = SUFFIXES.get(path.suffix.lower(), "text")
    if fmt == "markdown" and (any(p in ("pages", "journals") for p in path.parts)
                              or re.search(r"^\s*[^\s:]+:: ", text, re.M)
                              or next((l for l in text.splitlines() if l.strip()), "").lstrip().startswith("- ")):
        return "logseq"
    return fmt


def read_notes(paths, fmt: str = "auto", skip_bad: bool = False, session_gap: float = 1800.0,
               max_steps: int = 32) -> NotesResult:
    """Files and folders (read recursively: .md .markdown .txt .text .jsonl .ndjson; hidden folders and a
    Logseq graph's own logseq/ folder are left out) -> conversations, with counts and skips."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown notes format '{fmt}'; use one of {', '.join(FORMATS)}")
    if session_gap <= 0 or max_steps < 1:
        raise ConfigError(f"the session gap must be positive and max steps at least 1 (got {session_gap} s, {max_steps})")
    result = NotesResult()
    for spec in paths:
        try:
            files = _files(str(spec))
        except DataError:
            if not skip_bad:
                raise
            result.skipped.append((str(spec), "no notes files"))
            continue
        for path in files:
            try:
                text = _read(path)
            except DataError:
                if not skip_bad:
                    raise
                result.skipped.append((str(path), "unreadable file"))
                continue
            kind = detect_format(path, text) if fmt == "auto" else fmt
            try:
                if kind == "activity":
                    events = read_activity(text, str(path), skip_bad, result.skipped)
                    convs = activity_conversations(events, str(path), session_gap, max_steps, result.skipped)
                else:
                    page = parse_text(text, path) if kind == "text" else parse_outline(text, path)
                    convs = page_conversations(page)
            except DataError as e:
                if not skip_bad:
                    raise
                result.skipped.append((str(path), _reason(str(e))))
                continue
            result.files[kind] = result.files.get(kind, 0) + 1
            result.conversations.extend(convs)
    return result


def write_notes(paths, out: str | Path, **options) -> NotesResult:
    """read_notes(paths, **options), written atomically to `out` as JSONL (one conversation a line). No
    conversation at all is an error, and `out` is left as it was."""
    from ..io import atomic_write_bytes

    out = Path(out)
    inputs = {Path(p).resolve() for p in paths}
    if out.resolve() in inputs or any(d in out.resolve().parents and d.is_dir() for d in inputs):
        raise ConfigError(f"--out {out} is among the notes being read; write it somewhere else")
    result = read_notes(paths, **options)
    if not result.conversations:
        skipped = f" ({len(result.skipped)} skipped)" if result.skipped else ""
        raise DataError(f"no conversations from {', '.join(map(str, paths))}{skipped}; {out} was not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in result.conversations).encode())
    return result
