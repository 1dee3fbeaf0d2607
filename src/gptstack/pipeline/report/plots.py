"""The report's plots: matplotlib figures drawn on the Agg canvas (no pyplot, no display), returned as PNG bytes.

build_plots(data) -> {"time", "pretraining", "sft", "accuracy", "collapse", "rl", "rm", "dpo": PNG bytes}, only the
plots the run has data for. Stage colours and legend labels come from the stage table.
"""

from __future__ import annotations

import io

from ..stages import BY_NAME, STAGES, color, label
from .collect import DPO_STAGES, PAIRWISE, PRETRAIN, REWARD_MODEL, SFT_STAGES, num
from .tables import collapse_points, fmt_count, fmt_seconds, task_names

# the stage table's colour for stages it gives none of their own (its `color` field's default): grey
NEUTRAL = type(STAGES[0]).color


def _figure(ncols: int = 1, width: float = 10.5, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)     # no pyplot: no global state, no display backend
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e5e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_color("#9ca3af")
        ax.tick_params(colors="#374151", labelsize=9)
    return fig, axes


def _title(ax, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=11, color="#111827", fontweight="bold")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _smooth(ys: list[float], half: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends): no lag, unlike an EMA."""
    out = []
    for i in range(len(ys)):
        w = min(half, i, len(ys) - 1 - i)
        out.append(sum(ys[i - w:i + w + 1]) / (2 * w + 1))
    return out


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(num(r.get(x)), num(r.get(key))) for r in records]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    return [a for a, _ in pts], [b for _, b in pts]


def _curve(ax, xs, ys, stage: str, name: str | None = None, smooth: bool = False) -> None:
    if not xs:
        return
    c = color(stage)
    if smooth and len(ys) > 8:
        ax.plot(xs, ys, color=c, alpha=0.25, linewidth=1)
        ax.plot(xs, _smooth(ys, max(2, len(ys) // 20)), color=c, linewidth=2, label=name or label(stage))
    else:
        ax.plot(xs, ys, color=c, linewidth=2, marker="o" if len(xs) < 12 else None, markersize=3.5,
                label=name or label(stage))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=9)


def plot_pretraining(data) -> bytes | None:
    base = data["runs"].get(PRETRAIN)
    if not base or not (base["train"] or base["eval"]):
        return None
    fig, (a, b) = _figure(2)
    xs, ys = _series(base["train"], "loss", "tokens")
    _curve(a, xs, ys, PRETRAIN, "train loss", smooth=True)
    vx, vy = _series(base["eval"], "val_loss", "tokens")
    if vx:
        a.plot(vx, vy, color="#111827", linewidth=1.5, linestyle="--", marker="o", markersize=4, label="val loss")
    _title(a, "Loss (nats/token) vs tokens seen")
    a.set_xlabel("tokens", fontsize=9)
    _legend(a)
    bx, by = _series(base["eval"], "val_bpb", "tokens")
    if bx:
        b.plot(bx, by, color=color(PRETRAIN), linewidth=2, marker="o", markersize=4)
        b.annotate(f"{by[-1]:.3f}", (bx[-1], by[-1]), textcoords="offset points", xytext=(-6, 8), ha="right",
                   fontsize=9, color="#111827")
    else:
        b.text(0.5, 0.5, "no validation evaluations logged", ha="center", va="center", transform=b.transAxes,
               color="#6b7280")
    _title(b, "Validation bits per byte")
    b.set_xlabel("tokens", fontsize=9)
    if xs or vx:
        b.set_xlim(a.get_xlim())      # same token axis as the loss panel, even with one evaluation
    for ax in (a, b):
        ax.xaxis.set_major_formatter(_count_formatter())
    return _png(fig)


def _count_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: fmt_count(v) if v else "0")


def plot_sft(data) -> bytes | None:
    stages = [s for s in SFT_STAGES if data["runs"].get(s) and data["runs"][s]["train"]]
    if not stages:
        return None
    fig, (a, b) = _figure(2)
    for s in stages:
        xs, ys = _series(data["runs"][s]["train"], "loss")
        _curve(a, xs, ys, s, smooth=True)
        vx, vy = _series(data["runs"][s]["eval"], "val_loss")
        _curve(b, vx, vy, s)
    _title(a, "Training loss (assistant tokens)")
    _title(b, "Validation loss")
    if not b.lines:
        b.text(0.5, 0.5, "no validation evaluations logged", ha="center", va="center", transform=b.transAxes,
               color="#6b7280")
    for ax in (a, b):
        ax.set_xlabel("step", fontsize=9)
        _legend(ax)
    return _png(fig)


RL_KEYS = (("reward", "Reward (mean of rollouts)"), ("kl", "KL to reference"), ("entropy", "Policy entropy (nats)"))
DPO_KEYS = (("accuracy", "val_accuracy", "Preference accuracy"),
            ("reward_margin", "val_reward_margin", "Implicit reward margin"))
RM_KEYS = (("accuracy", "val_accuracy", "Pair accuracy"), ("margin", "val_margin", "Score margin (chosen − rejected)"))


def plot_rl(data) -> bytes | None:
    stages = [s for s, r in data["runs"].items() if any(k in rec for rec in r["train"] for k, _ in RL_KEYS)
              and s not in PAIRWISE]
    if not stages:
        return None
    fig, axes = _figure(3, height=3.2)
    for ax, (key, title) in zip(axes, RL_KEYS):
        for s in stages:
            xs, ys = _series(data["runs"][s]["train"], key)
            _curve(ax, xs, ys, s, smooth=True)
        _title(ax, title)
        ax.set_xlabel("step", fontsize=9)
    _legend(axes[0])
    return _png(fig)


def _plot_pairs(run: dict, keys, stage: str) -> bytes | None:
    if not any(k in rec for rec in run["train"] for k, _, _ in keys):
        return None
    fig, axes = _figure(len(keys), height=3.0)
    for ax, (key, val_key, title) in zip(axes, keys):
        xs, ys = _series(run["train"], key)
        _curve(ax, xs, ys, stage, "train", smooth=True)
        vx, vy = _series(run["eval"], val_key)
        if vx:
            ax.plot(vx, vy, color="#111827", linestyle="--", linewidth=1.5, marker="o", markersize=4, label="validation")
        _title(ax, title)
        ax.set_xlabel("step", fontsize=9)
        _legend(ax)
    return _png(fig)


def _bar_color(stage: str) -> str:
    """The stage's own colour, grey for rows the table gives none (tokenizer, prefs, eval, report, extra runs)."""
    return BY_NAME[stage].color if stage in BY_NAME else NEUTRAL


def plot_time(data) -> bytes | None:
    rows = [(r["stage"], num(r["seconds"])) for r in data["stages"] if num(r["seconds"])]
    if not rows:
        return None
    fig, (ax,) = _figure(1, height=0.26 * len(rows) + 0.9)
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [s for _, s in rows], color=[_bar_color(n) for n, _ in rows], height=0.62)
    ax.set_yticks(ys, [label(n) for n, _ in rows])
    for y, (_, s) in zip(ys, rows):
        ax.text(s, y, "  " + fmt_seconds(s), va="center", fontsize=9, color="#374151")
    ax.set_xlim(0, max(s for _, s in rows) * 1.18)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("seconds", fontsize=9)
    _title(ax, "Wall-clock time per stage")
    return _png(fig)


def plot_accuracy(data) -> bytes | None:
    evals = {s: e for s, e in data["evals"].items() if e.get("tasks")}
    tasks = task_names(evals)
    if not tasks:
        return None
    import numpy as np

    fig, (ax,) = _figure(1, height=3.6)
    width = 0.8 / len(evals)
    x = np.arange(len(tasks))
    for i, (s, ev) in enumerate(evals.items()):
        vals = [num((ev["tasks"].get(t) or {}).get("greedy")) for t in tasks]
        ax.bar(x + (i - (len(evals) - 1) / 2) * width, [v or 0 for v in vals], width * 0.92, color=color(s),
               label=label(s))
    ax.set_xticks(x, [t.replace("_", " ") for t in tasks], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(_pct_formatter())
    ax.grid(axis="x", visible=False)
    _title(ax, "Greedy task accuracy by stage")
    ax.legend(frameon=False, fontsize=9, ncol=min(6, len(evals)), loc="upper left", bbox_to_anchor=(0, -0.12))
    return _png(fig)


def _pct_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{100 * v:.0f}%")


def plot_collapse(data) -> bytes | None:
    pts = [(s, m, d) for s, m, d in collapse_points(data) if num(d.get("quality")) is not None]
    if not pts:
        return None
    fig, axes = _figure(2, height=3.7)
    for ax, (key, ylabel) in zip(axes, (("distinct_2", "distinct-2 (higher: more varied wording)"),
                                        ("entropy", "next-token entropy (nats)"))):
        plain = {s: d for s, m, d in pts if not m}
        for s, mixed, d in pts:
            x, y = num(d.get("quality")), num(d.get(key))
            if y is None:
                continue
            ax.scatter([x], [y], s=70, color="white" if mixed else color(s), edgecolors=color(s), linewidths=2,
                       zorder=3)
            ax.annotate(label(s) + (" + base mix" if mixed else ""), (x, y), textcoords="offset points",
                        xytext=(7, 5), fontsize=8.5, color="#374151")
            if mixed and s in plain and num(plain[s].get(key)) is not None:
                ax.annotate("", xy=(x, y), xytext=(plain[s]["quality"], plain[s][key]),
                            arrowprops=dict(arrowstyle="->", color=color(s), lw=1.3, alpha=0.7))
        ax.set_xlabel("quality (mean task reward of the samples)", fontsize=9)
        _title(ax, ylabel)
        ax.margins(0.18)
    return _png(fig)


def build_plots(data: dict) -> dict[str, bytes]:
    """Every plot the run has data for, by name (the name of its PNG in report_files/)."""
    plots = {"time": plot_time(data), "pretraining": plot_pretraining(data), "sft": plot_sft(data),
             "accuracy": plot_accuracy(data), "collapse": plot_collapse(data), "rl": plot_rl(data)}
    if REWARD_MODEL in data["runs"]:
        plots["rm"] = _plot_pairs(data["runs"][REWARD_MODEL], RM_KEYS, REWARD_MODEL)
    for s in DPO_STAGES:
        if s in data["runs"]:
            plots["dpo"] = _plot_pairs(data["runs"][s], DPO_KEYS, s)
    return {k: v for k, v in plots.items() if v}
