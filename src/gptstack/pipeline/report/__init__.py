"""The pipeline report: one page that shows what a run made, rebuilt from the run directories alone.

    build_report(RUN_ROOT) -> RUN_ROOT/report.html   (+ report.md, report.json, report_files/*.png)

    collect.py   reads the run root (pipeline.json, <stage>/ run directories, eval/<stage>.json) into one dict
    tables.py    the tables' rows and the other text both renderings show
    plots.py     matplotlib figures (Agg canvas) -> PNG bytes
    render.py    the one list of sections (SECTIONS), rendered as HTML (report.html.j2 + report.css, Jinja2,
                 autoescaped) and as Markdown

Every piece of a run is optional: a skipped or failed stage is shown as such and the page says what is missing.
The HTML is self-contained (plots are base64 PNGs, CSS is inline, the only links are in-page anchors), so it can
be mailed or archived as one file. The Markdown carries the same sections and tables and links the plots in
report_files/; the JSON is the collected numbers for machines.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...io import atomic_write_bytes
from .collect import REWARD_MODEL, collect
from .plots import build_plots
from .render import SECTIONS, render_html, render_markdown

__all__ = ["SECTIONS", "build_plots", "build_report", "collect", "render_html", "render_markdown"]


def build_report(run_root: str | Path, samples_per_stage: int = 3) -> Path:
    """Write RUN_ROOT/report.html (self-contained), report.md (+ report_files/*.png) and report.json from the
    run directories alone; returns the HTML's path."""
    root = Path(run_root)
    data = collect(root)
    plots = build_plots(data)
    files = root / "report_files"
    files.mkdir(exist_ok=True)
    for name, png in plots.items():
        atomic_write_bytes(files / f"{name}.png", png)
    plot_files = {name: f"report_files/{name}.png" for name in plots}
    atomic_write_bytes(root / "report.html", render_html(data, plots, samples_per_stage).encode("utf-8"))
    atomic_write_bytes(root / "report.md",
                       render_markdown(data, plots, plot_files, samples_per_stage).encode("utf-8"))
    summary = {k: data[k] for k in ("run_root", "built", "summary", "stages", "machine", "throughput", "missing",
                                    "notes", "evals")}
    summary["reward_model"] = ((data["runs"].get(REWARD_MODEL) or {}).get("state") or {}).get("last")
    summary["final"] = {n: (r["state"] or {}).get("last") for n, r in data["runs"].items()}
    summary["plots"] = plot_files
    atomic_write_bytes(root / "report.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return root / "report.html"
