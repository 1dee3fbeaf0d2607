"""A map of an SFT data set: every conversation embedded, projected to 2-D, and drawn.

    points = build_map(conversations, labels, embedder="minilm")      # embeddings -> t-SNE (UMAP if installed)
    write_map(points, out_dir)                                         # map.png, map.html, points.jsonl
    order = curriculum_order(distances, "center-out")                  # the SFT curriculum from the same map
    write_cartography_map(*cartography_points(*read_cartography(RUN)), out_dir)   # training dynamics (cartography.py)

Embeddings are the packaged MiniLM's (data/embed.py) of the conversation's text, or a run's own mean final
hidden states over the rendered conversation (`embedder=RUN`). The centre is the embedding centroid; each
point's distance to it (cosine distance for MiniLM's unit vectors) is what the center-out / outside-in
curricula sort by, so the map shows the order the model will see the data in.

The second map is Dataset Cartography's (Swayamdipta et al. 2020): each conversation's confidence (y) against
its variability (x) over the SFT epochs of a run trained with --cartography, in easy-to-learn / ambiguous /
hard-to-learn regions; easy-first / hard-first order by that confidence.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import CURRICULA as ORDERS
from ..errors import ConfigError, DataError


@dataclass
class MapPoint:
    index: int
    x: float
    y: float
    label: str          # the task (task mixture) or the source file
    distance: float     # from the embedding centroid
    text: str           # what the hover shows


def conversation_text(messages: Sequence[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def embed_conversations(conversations: Sequence[Sequence[dict]], embedder: str = "minilm") -> np.ndarray:
    """(N, D) float32: MiniLM sentence embeddings, or a run's mean final hidden states over each rendered
    conversation (`embedder` is then the run directory)."""
    if not conversations:
        raise DataError("the data set has no conversations to map")
    if embedder == "minilm":
        from .embed import embed

        return embed([conversation_text(c) for c in conversations])
    import torch

    from ..model.gpt import core_gpt
    from ..runs import load_model

    model, tok, _ = load_model(embedder, "cpu")
    gpt = core_gpt(model)
    out = []
    with torch.no_grad():
        for conv in conversations:
            ids = tok.render_conversation(conv)[0][: gpt.config.seq_len]
            h = gpt.hidden_states(torch.tensor([ids]))[0]
            out.append(h.float().mean(0).numpy())
    return np.stack(out).astype(np.float32)


def centroid_distances(vectors: np.ndarray) -> np.ndarray:
    """Distance of every embedding to the centroid: cosine distance (1 - cos) on the normalised vectors."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    centre = unit.mean(0)
    centre /= max(np.linalg.norm(centre), 1e-12)
    return (1.0 - unit @ centre).astype(np.float64)


def project_2d(vectors: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """(N, 2) coordinates and the method used: UMAP when installed and asked for (auto), else t-SNE."""
    n = len(vectors)
    if n < 3:
        raise DataError(f"a map needs at least 3 conversations, got {n}")
    if method in ("auto", "umap"):
        try:
            import umap  # optional
            return umap.UMAP(random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(vectors), "umap"
        except ImportError:
            if method == "umap":
                raise ConfigError("--projection umap needs umap-learn (pip install umap-learn)") from None
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (n - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
    return np.asarray(xy, dtype=np.float64), "tsne"


def build_map(conversations: Sequence[Sequence[dict]], labels: Sequence[str], embedder: str = "minilm",
              seed: int = 0, method: str = "auto") -> tuple[list[MapPoint], dict]:
    vectors = embed_conversations(conversations, embedder)
    dist = centroid_distances(vectors)
    xy, used = project_2d(vectors, seed, method)
    points = [MapPoint(i, float(xy[i, 0]), float(xy[i, 1]), labels[i], float(dist[i]),
                       conversation_text(conversations[i])[:600]) for i in range(len(conversations))]
    centre = int(np.argmin(dist))
    info = {"n": len(points), "embedder": embedder, "projection": used, "centre_index": centre,
            "labels": sorted(set(labels))}
    return points, info


def curriculum_order(keys: Sequence[float | None], order: str, seed: int = 0) -> list[int]:
    """A permutation of range(N) in the stated order, ties by index. `keys` are distances from the embedding
    centroid for center-out (nearest first) / outside-in (farthest first), and cartography confidences for
    easy-first (most confident first) / hard-first (least confident first); a conversation the cartography
    run never trained on (key None) goes last in both. random: a seeded shuffle, keys unused."""
    if order not in ORDERS:
        raise ConfigError(f"unknown --order {order!r}; choose one of {', '.join(ORDERS)}")
    n = len(keys)
    if order == "random":
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.permutation(n)]
    known = [i for i in range(n) if keys[i] is not None and not math.isnan(keys[i])]
    known_set = set(known)
    unknown = [i for i in range(n) if i not in known_set]
    if order in ("center-out", "outside-in") and unknown:
        raise DataError(f"{len(unknown)} conversations have no distance from the centre")
    ascending = order in ("center-out", "hard-first")
    keyed = sorted(known, key=lambda i: (keys[i] if ascending else -keys[i], i))
    return keyed + unknown


# ---- writing the maps -------------------------------------------------------------------------------------

_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#9333ea", "#0891b2", "#db2777", "#65a30d", "#475569",
           "#b45309"]
REGION_COLORS = {"easy-to-learn": "#16a34a", "ambiguous": "#d97706", "hard-to-learn": "#dc2626"}


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    return {lab: _COLORS[i % len(_COLORS)] for i, lab in enumerate(labels)}


def write_map(points: Sequence[MapPoint], info: dict, out_dir, title: str = "data map") -> dict[str, Path]:
    """map.png, a self-contained interactive map.html (no network: inline data, script and style) and
    points.jsonl (one point per line, in data-set order)."""
    from ..io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    color = label_colors(info["labels"])
    paths = {"png": out / "map.png", "html": out / "map.html", "points": out / "points.jsonl"}
    atomic_write_bytes(paths["points"], "".join(json.dumps(asdict(p)) + "\n" for p in points).encode())
    atomic_write_bytes(paths["png"], _png(points, info, color, title))
    page = {"summary": f"{info['n']} conversations, {info['projection']} of {info['embedder']} embeddings; the star "
                       "is the point nearest the centroid",
            "categorical": {"label": {"name": "task / source", "colors": color}},
            "numeric": {"distance": "distance from the centre"}, "star": info["centre_index"], "density": True}
    atomic_write_bytes(paths["html"], scatter_page([asdict(p) for p in points], info, page, title).encode())
    return paths


def _png(points, info, color, title) -> bytes:
    plt = _pyplot()
    xs, ys = np.array([p.x for p in points]), np.array([p.y for p in points])
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    if len(points) >= 20:   # density underneath the points
        ax.hexbin(xs, ys, gridsize=25, cmap="Greys", mincnt=1, alpha=0.35, linewidths=0)
    for lab in info["labels"]:
        sel = [i for i, p in enumerate(points) if p.label == lab]
        ax.scatter(xs[sel], ys[sel], s=10, c=color[lab], label=lab, alpha=0.8, linewidths=0)
    c = points[info["centre_index"]]
    ax.scatter([c.x], [c.y], marker="*", s=260, c="gold", edgecolors="black", zorder=5, label="centre")
    ax.set_title(f"{title}: {info['n']} conversations ({info['projection']}, {info['embedder']})", fontsize=10)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    return _png_bytes(fig, plt)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_bytes(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---- the cartography map: confidence against variability ----------------------------------------------------

def write_cartography_map(points: list[dict], info: dict, out_dir, title: str = "data cartography"
                          ) -> dict[str, Path]:
    """cartography.png and an interactive cartography.html (the data map's page) in `out_dir`, from
    cartography.cartography_points."""
    from ..io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "cartography.png", "html": out / "cartography.html"}
    atomic_write_bytes(paths["png"], _cartography_png(points, info, title))
    guides = {"x": [info["variability_cut"]] if info["variability_cut"] is not None else [],
              "y": [info["confidence_cut"]] if info["confidence_cut"] is not None else []}
    regions = ", ".join(f"{k} {v}" for k, v in info["regions"].items())
    page = {"summary": f"{info['n']} conversations over {info['epochs_min']}-{info['epochs_max']} epochs ({regions})"
                       + (f"; {info['unseen']} never trained on, not shown" if info["unseen"] else ""),
            "categorical": {"region": {"name": "region", "colors": REGION_COLORS},
                            "label": {"name": "task / source", "colors": label_colors(info["labels"])}},
            "numeric": {"correctness": "correctness", "confidence": "confidence", "variability": "variability",
                        "epochs": "epochs"},
            "axes": {"x": "variability (std of confidence over epochs)", "y": "confidence (mean over epochs)"},
            "guides": guides, "star": None, "density": False}
    atomic_write_bytes(paths["html"], scatter_page(points, info, page, title).encode())
    return paths


def _cartography_png(points, info, title) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    for reg, col in REGION_COLORS.items():
        sel = [p for p in points if p["region"] == reg]
        ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], s=12, c=col, alpha=0.75, linewidths=0,
                   label=f"{reg} ({len(sel)})")
    if info["variability_cut"] is not None:
        ax.axvline(info["variability_cut"], color="#555", ls="--", lw=0.8)
    if info["confidence_cut"] is not None:
        ax.axhline(info["confidence_cut"], color="#555", ls="--", lw=0.8)
    ax.set_xlabel("variability (std of confidence over epochs)")
    ax.set_ylabel("confidence (mean exp(mean log p) of the gold reply)")
    ax.set_title(f"{title}: {info['n']} conversations, {info['epochs_min']}-{info['epochs_max']} epochs", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return _png_bytes(fig, plt)


def scatter_page(points: list[dict], info: dict, page: dict, title: str) -> str:
    """A self-contained interactive scatter (canvas, no network): colour by any categorical or numeric field,
    hover shows the point's text, optional axes, guide lines, density and a starred point."""
    data = json.dumps({"points": points, "info": info, "page": page})
    data = data.replace("</", "<\\/")   # nothing in the data can close the script element
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #111; }
#wrap { position: relative; display: inline-block; }
canvas { border: 1px solid #ddd; }
#tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #999; padding: 6px 8px;
       max-width: 420px; white-space: pre-wrap; font: 12px ui-monospace, monospace; display: none; }
#legend span { margin-right: 12px; }
</style></head><body>
<h1 style="font-size:18px">__TITLE__</h1>
<p id="summary"></p>
<label>colour by <select id="colorby"></select></label>
<label id="densitybox"><input type="checkbox" id="density" checked> density</label>
<div id="legend"></div>
<div id="wrap"><canvas id="map" width="800" height="640"></canvas><div id="tip"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const P = D.page, pts = D.points, canvas = document.getElementById("map"), ctx = canvas.getContext("2d");
const tip = document.getElementById("tip"), select = document.getElementById("colorby");
const xs = pts.map(p => p.x), ys = pts.map(p => p.y);
const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
const pad = P.axes ? 56 : 20, W = canvas.width, H = canvas.height;
const sx = x => pad + (x - x0) / ((x1 - x0) || 1) * (W - pad - 20);
const sy = y => H - pad - (y - y0) / ((y1 - y0) || 1) * (H - pad - 20);
document.getElementById("summary").textContent = P.summary;
if (!P.density) document.getElementById("densitybox").style.display = "none";
for (const [field, spec] of Object.entries(P.categorical)) select.add(new Option(spec.name, field));
for (const [field, name] of Object.entries(P.numeric || {})) select.add(new Option(name, field));
const fmax = f => Math.max(...pts.map(p => p[f])) || 1;
function colour(p) {
  const f = select.value, cat = P.categorical[f];
  if (cat) return cat.colors[p[f]] || "#444";
  const t = p[f] / fmax(f); return `rgb(${Math.round(255 * t)}, 60, ${Math.round(255 * (1 - t))})`;
}
function drawAxes() {
  ctx.strokeStyle = "#888"; ctx.fillStyle = "#333"; ctx.font = "12px system-ui";
  ctx.beginPath(); ctx.moveTo(pad, 20); ctx.lineTo(pad, H - pad); ctx.lineTo(W - 20, H - pad); ctx.stroke();
  for (let k = 0; k <= 4; k++) {
    const vx = x0 + (x1 - x0) * k / 4, vy = y0 + (y1 - y0) * k / 4;
    ctx.fillText(vx.toFixed(3), sx(vx) - 14, H - pad + 16); ctx.fillText(vy.toFixed(3), 4, sy(vy) + 4);
  }
  ctx.fillText(P.axes.x, W / 2 - 100, H - 12);
  ctx.save(); ctx.translate(14, H / 2 + 80); ctx.rotate(-Math.PI / 2); ctx.fillText(P.axes.y, 0, 0); ctx.restore();
  ctx.setLineDash([5, 4]);
  for (const gx of (P.guides && P.guides.x) || []) { ctx.beginPath(); ctx.moveTo(sx(gx), 20); ctx.lineTo(sx(gx), H - pad); ctx.stroke(); }
  for (const gy of (P.guides && P.guides.y) || []) { ctx.beginPath(); ctx.moveTo(pad, sy(gy)); ctx.lineTo(W - 20, sy(gy)); ctx.stroke(); }
  ctx.setLineDash([]);
}
function draw() {
  ctx.clearRect(0, 0, W, H);
  if (P.density && document.getElementById("density").checked) {
    const n = 24, grid = new Array(n * n).fill(0);
    for (const p of pts) {
      const i = Math.min(n - 1, Math.floor((sx(p.x) / W) * n)), j = Math.min(n - 1, Math.floor((sy(p.y) / H) * n));
      grid[j * n + i] += 1;
    }
    const gmax = Math.max(...grid) || 1;
    for (let j = 0; j < n; j++) for (let i = 0; i < n; i++) {
      if (!grid[j * n + i]) continue;
      ctx.fillStyle = `rgba(0,0,0,${0.25 * grid[j * n + i] / gmax})`;
      ctx.fillRect(i * W / n, j * H / n, W / n, H / n);
    }
  }
  if (P.axes) drawAxes();
  for (const p of pts) {
    ctx.fillStyle = colour(p); ctx.beginPath(); ctx.arc(sx(p.x), sy(p.y), 3, 0, 2 * Math.PI); ctx.fill();
  }
  if (P.star !== null && P.star !== undefined) {
    const c = pts[P.star];
    ctx.fillStyle = "gold"; ctx.strokeStyle = "black"; ctx.beginPath();
    ctx.arc(sx(c.x), sy(c.y), 8, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
  }
  const legend = document.getElementById("legend"), cat = P.categorical[select.value];
  legend.textContent = "";
  for (const [name, col] of Object.entries(cat ? cat.colors : {})) {
    const s = document.createElement("span"); s.textContent = "\\u25CF " + name; s.style.color = col;
    legend.appendChild(s);
  }
}
canvas.addEventListener("mousemove", e => {
  const r = canvas.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
  let best = null, bd = 64;
  for (const p of pts) { const d = (sx(p.x) - mx) ** 2 + (sy(p.y) - my) ** 2; if (d < bd) { bd = d; best = p; } }
  if (!best) { tip.style.display = "none"; return; }
  const nums = Object.keys(P.numeric || {}).map(f => `${f} ${Number(best[f]).toFixed(3)}`).join("  ");
  const cats = Object.keys(P.categorical).map(f => best[f]).filter(v => v).join(", ");
  tip.textContent = `#${best.index} [${cats}] ${nums}\\n` + best.text;
  tip.style.left = (mx + 12) + "px"; tip.style.top = (my + 12) + "px"; tip.style.display = "block";
});
canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
select.addEventListener("change", draw);
document.getElementById("density").addEventListener("change", draw);
draw();
</script></body></html>
"""
