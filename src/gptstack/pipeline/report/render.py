"""The report's two renderings, HTML (a Jinja2 template, autoescaped) and Markdown, of one list of sections.

SECTIONS says, once, what the report shows and in which order: each section's anchor, title, navigation label,
lead sentence and blocks (tables from tables.py, plots from plots.py, facts, notices), and what it says when the
run has none of it. `sections(data, plots, plot_files)` resolves those blocks against a run's data; both
renderers iterate over the result, so they cannot disagree on titles, order or contents.

The HTML is self-contained: report.html.j2 inlines report.css and the plots as data: URIs; its only links are
in-page anchors. Every value reaches the page through the template's autoescaping.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from ..stages import BY_NAME, label
from . import tables
from .collect import PRETRAIN, SFT_STAGES
from .tables import fmt, fmt_count, fmt_seconds, pct

TEMPLATE_DIR = Path(__file__).resolve().parent
TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class Block:
    """One piece of a section. kind: "table" (key: a name in tables.TABLES), "plot" (key: a name from
    plots.build_plots), "notice" (what is missing, failed or under-trained), "warnings" (low-throughput
    warnings), "machine" (machine facts), "pretraining" (a sentence on the pretraining run), "conversations"
    (the sample cards). A block with nothing to show says `empty`, or is left out when that is ""."""
    kind: str
    key: str = ""
    title: str = ""     # a sub-heading above it
    alt: str = ""       # a plot's alt text
    empty: str = ""


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    nav: str            # its name in the page's navigation bar
    lead: str
    blocks: tuple[Block, ...]
    empty: str = ""     # shown when none of its blocks has anything
    needs: str = ""     # the key of a block without which the section shows only `empty`


def _dirs(names) -> str:
    return ", ".join(f"{BY_NAME[n].output}/" for n in names)


SECTIONS: tuple[Section, ...] = (
    Section("stages", "Stages & time", "Stages & time", "What ran, how long it took and what it ended at.",
            (Block("notice"), Block("table", "stages"), Block("plot", "time", alt="time per stage"))),
    Section("machine", "Machine & throughput", "Machine",
            "Where these figures came from, the precision chosen there, and whether each time-budgeted stage got "
            "the work the preset plans.",
            (Block("warnings"),
             Block("machine", empty="No machine recorded (runs made before gptstack recorded their machine)."),
             Block("table", "throughput"))),
    Section("pretraining", "Pretraining", "Pretraining",
            "Next-token loss on the training stream and bits per byte on held-out text "
            "(lower is better; bpb does not depend on the tokenizer).",
            (Block("pretraining"), Block("plot", "pretraining", alt="pretraining loss and validation bpb")),
            empty=f"No pretraining run ({_dirs([PRETRAIN])}) in this directory."),
    Section("sft", "Supervised fine-tuning", "SFT", "Loss on assistant tokens only, full fine-tuning and LoRA.",
            (Block("plot", "sft", alt="SFT loss curves"),),
            empty=f"No SFT run ({_dirs(SFT_STAGES)})."),
    Section("accuracy", "Task accuracy", "Task accuracy",
            "Held-out accuracy on the synthetic verifiable tasks, greedy decoding, per stage.",
            (Block("table", "accuracy"), Block("plot", "accuracy", alt="task accuracy by stage"),
             Block("table", "decoding", "Decoding strategies (mean over tasks)"),
             Block("table", "cot", "Chain of thought vs direct answers (greedy)"),
             Block("table", "json", "Valid JSON (extraction task)"),
             Block("table", "retrieval", "Retrieval vs memory (facts task: questions about invented facts, BM25 "
                                         "top-1 passage from the facts corpus)")),
            empty="No evaluation results (eval/*.json).", needs="accuracy"),
    Section("collapse", "Model collapse", "Model collapse",
            "K samples per prompt at temperature 1. Alignment trades diversity for quality: entropy and distinct-n "
            "fall, self-BLEU and embedding similarity rise. Hollow points: the chat model's logits mixed with its "
            "base model's at sampling time.",
            (Block("table", "collapse"), Block("plot", "collapse", alt="diversity versus quality")),
            empty="No diversity measurements (\"diversity\" in eval/*.json)."),
    Section("alignment", "Reward model & RL", "Reward model & RL",
            "Bradley–Terry reward model on preference pairs; policy optimisation against it and the task checker, "
            "held near the SFT model by a KL penalty.",
            (Block("table", "alignment", "SFT → RL → DPO → distilled: accuracy, distance from SFT, entropy"),
             Block("table", "rm", "Reward model"), Block("plot", "rm", alt="reward model curves"),
             Block("plot", "rl", "RL (GRPO / PPO)", alt="RL reward, KL and entropy curves"),
             Block("plot", "dpo", "DPO", alt="DPO accuracy and margin curves")),
            empty="No reward model, RL or DPO run in this directory."),
    Section("samples", "Sample conversations", "Samples", "Held-out prompts and each stage's reply.",
            (Block("conversations",
                   empty="No sample conversations were saved (eval/<stage>.json \"samples\")."),)),
)
BY_ID = {s.id: s for s in SECTIONS}


# ---- resolving the sections against a run ----------------------------------------------------------------

def _content(block: Block, data: dict, plots: dict[str, bytes], plot_files: dict[str, str],
             samples_per_stage: int) -> dict | None:
    """What a block shows for this run, as {"kind", ...}; None when it has nothing."""
    k = block.kind
    if k == "table":
        t = tables.TABLES[block.key](data)
        return {"table": t} if t and t.rows else None
    if k == "plot":
        png = plots.get(block.key)
        return {"png": png, "path": plot_files.get(block.key, f"report_files/{block.key}.png")} if png else None
    if k == "notice":
        items, failed = data["missing"] + data["notes"], [label(f) for f in data["summary"]["failed"]]
        low = tables.low_throughput(data)
        return {"low": low, "items": items, "failed": failed, "see": BY_ID["machine"]} if low or items or failed \
            else None
    if k == "warnings":
        items = [r["warning"] for r in data["throughput"] if r["warning"]]
        return {"items": items} if items else None
    if k == "machine":
        items = tables.machine_lines(data)
        return {"items": items} if items else None
    if k == "pretraining":
        text = tables.pretraining_facts(data, PRETRAIN)
        return {"text": text} if text else None
    if k == "conversations":
        cards = tables.conversations(data, samples_per_stage)
        return {"cards": cards} if cards else None
    raise ValueError(f"unknown report block kind {k!r}")


def sections(data: dict, plots: dict[str, bytes], plot_files: dict[str, str] | None = None,
             samples_per_stage: int = 3) -> list[dict]:
    """SECTIONS resolved against a run: [{"id", "title", "nav", "lead", "blocks": [{"kind", "title", ...}]}],
    every section in order; a block with nothing is left out or replaced by {"kind": "empty", "text"}, and a
    section none of whose blocks has anything (or without its `needs` block) holds one such block with the
    section's `empty` text."""
    plot_files = plot_files or {}
    out = []
    for sec in SECTIONS:
        blocks = []
        for b in sec.blocks:
            c = _content(b, data, plots, plot_files, samples_per_stage)
            if c is not None:
                blocks.append({"kind": b.kind, "key": b.key, "title": b.title, "alt": b.alt, **c})
            elif b.empty:
                blocks.append({"kind": "empty", "key": b.key, "title": "", "text": b.empty})
        if sec.needs and not any(b["key"] == sec.needs and b["kind"] != "empty" for b in blocks):
            blocks = []
        if not blocks and sec.empty:
            blocks = [{"kind": "empty", "key": "", "title": "", "text": sec.empty}]
        out.append({"id": sec.id, "title": sec.title, "nav": sec.nav, "lead": sec.lead, "blocks": blocks})
    return out


# ---- HTML -------------------------------------------------------------------------------------------------

_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

        _ENV = Environment(loader=FileSystemLoader(TEMPLATE_DIR),
                           autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default=True),
                           undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                           keep_trailing_newline=True)
        _ENV.filters["data_uri"] = data_uri
    return _ENV


def data_uri(png: bytes) -> str:
    """A PNG inlined into the page (a plot stays part of the one self-contained file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def tiles(data: dict) -> list[tuple[str, str, str | None]]:
    """The page header's figures: (name, value, small print or None)."""
    s = data["summary"]
    m = s["model"] or {}
    return [("preset", s["preset"] or "—", None),
            ("total time", fmt_seconds(s["total_seconds"]), None),
            ("final val bpb", fmt(s["final_val_bpb"]), None),
            ("model", f"d{m['n_layer']}" if m.get("n_layer") else "—",
             f"{fmt_count(s['params'])} params" if m.get("n_layer") else None),
            ("pretrain tokens", fmt_count(s["pretrain_tokens"]), None),
            ("best accuracy", pct(s["best_accuracy"]), label(s["best_stage"]) if s["best_stage"] else None),
            ("RM accuracy", pct(s["rm_val_accuracy"]), None)]


def architecture(data: dict) -> str:
    m = data["summary"]["model"]
    if not m:
        return ""
    return (f"d{m.get('n_layer')} · {m.get('n_embd')} wide · {m.get('n_head')} heads · vocab "
            f"{fmt_count(m.get('vocab_size'))} · context {m.get('seq_len')}")


def render_html(data: dict, plots: dict[str, bytes], samples_per_stage: int = 3) -> str:
    return _env().get_template(TEMPLATE).render(
        data=data, name=Path(data["run_root"]).name, arch=architecture(data), tiles=tiles(data),
        sections=sections(data, plots, samples_per_stage=samples_per_stage))


# ---- Markdown ---------------------------------------------------------------------------------------------

def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(t: tables.Table) -> str:
    rows = [[_md_cell(c.text) for c in row] for row in t.rows]
    numeric = [i > 0 and all(re.match(r"^[-+—\d.]", r[i] or "—") for r in rows) for i in range(len(t.head))]
    lines = ["| " + " | ".join(map(_md_cell, t.head)) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _quote(text) -> str:
    return "\n".join("> " + line for line in str(text).splitlines() or [""])


def _md_block(b: dict) -> str:
    k = b["kind"]
    if k == "table":
        return md_table(b["table"])
    if k == "plot":
        return f"![{b['alt']}]({b['path']})\n"
    if k == "empty":
        return f"_{b['text']}_\n"
    if k == "pretraining":
        return b["text"] + "\n"
    if k == "machine":
        return "".join(f"- {x}\n" for x in b["items"])
    if k == "warnings":
        return "\n".join(f"> **Warning:** {w}\n" for w in b["items"])
    if k == "notice":
        out = []
        if b["low"]:
            out.append(f"> **Less training than planned:** {', '.join(b['low'])} reached far fewer steps than the "
                       f"preset expects on this machine; see {b['see'].title}.\n")
        if b["items"] or b["failed"]:
            out.append("**Not in this report" + (f"** — failed: {', '.join(b['failed'])}:" if b["failed"] else ":**")
                       + "\n\n" + "".join(f"- {x}\n" for x in b["items"]))
        return "\n".join(out)
    if k == "conversations":
        out = []
        for card in b["cards"]:
            out.append("\n>\n".join(_quote(f"**{m['role']}:** {m['content']}") for m in card["messages"]) + "\n")
            for r in card["replies"]:
                out.append(f"*{r['label']}:*\n\n```\n{r['reply'].replace('```', '` ` `')}\n```\n")
        return "\n".join(out)
    raise ValueError(f"unknown report block kind {k!r}")


def render_markdown(data: dict, plots: dict[str, bytes], plot_files: dict[str, str],
                    samples_per_stage: int = 3) -> str:
    """The Markdown report; the plots are links to plot_files (report_files/<name>.png)."""
    s = data["summary"]
    out = [f"# gptstack run report\n\n`{data['run_root']}` — built {data['built']}\n",
           f"- preset: **{s['preset'] or '—'}**\n- total time: **{fmt_seconds(s['total_seconds'])}**\n"
           f"- final val bpb: **{fmt(s['final_val_bpb'])}**\n- parameters: {fmt_count(s['params'])}; "
           f"pretraining tokens: {fmt_count(s['pretrain_tokens'])}\n"
           f"- best task accuracy: {pct(s['best_accuracy'])}"
           f"{' (' + label(s['best_stage']) + ')' if s['best_stage'] else ''}\n"]
    for sec in sections(data, plots, plot_files, samples_per_stage):
        out.append(f"\n## {sec['title']}\n")
        for b in sec["blocks"]:
            out.append("\n" + (f"### {b['title']}\n\n" if b["title"] else "") + _md_block(b))
    return "".join(out)
