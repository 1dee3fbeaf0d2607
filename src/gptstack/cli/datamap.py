"""`gptstack datamap DATA --out DIR`: the SFT data set as a map (data/datamap.py); `gptstack datamap
--cartography RUN --out DIR`: the training-dynamics map of a run trained with `sft --cartography`."""

from __future__ import annotations


def load_labelled(data: str, tasks: str, examples_per_task: int, max_examples: int, seed: int):
    """(conversations, labels): the task mixture labelled by task, or conversation files labelled by file."""
    if data == "tasks":
        from ..data.tasks import generate_mixture

        examples = generate_mixture(tasks, "train", examples_per_task, seed)
        return [e.messages for e in examples], [e.task for e in examples]
    from pathlib import Path

    from ..data.chat import load_conversations

    convs, labels = [], []
    for spec in [s for s in data.split(",") if s]:
        got = load_conversations(spec, max_examples=max_examples or None)
        convs += got
        labels += [Path(spec).stem] * len(got)
    return convs, labels


def cmd_datamap(args) -> None:
    from ..errors import ConfigError

    if bool(args.data) == bool(args.cartography):
        raise ConfigError("give either DATA (the embedding map) or --cartography RUN (the training-dynamics map)")
    if args.cartography:
        return cmd_cartography_map(args)
    from ..data.datamap import build_map, write_map

    convs, labels = load_labelled(args.data, args.tasks, args.examples_per_task, args.max_examples, args.seed)
    points, info = build_map(convs, labels, embedder=args.embedder, seed=args.seed, method=args.projection)
    paths = write_map(points, info, args.out, title=f"data map of {args.data}")
    print(f"{info['n']} conversations, {len(info['labels'])} labels, {info['projection']} of {info['embedder']} "
          f"embeddings -> {paths['html']} (and map.png, points.jsonl)")


def cmd_cartography_map(args) -> None:
    from ..data.cartography import cartography_points, read_cartography
    from ..data.datamap import write_cartography_map

    header, records = read_cartography(args.cartography)
    points, info = cartography_points(header, records)
    paths = write_cartography_map(points, info, args.out, title=f"data cartography of {args.cartography}")
    seen = sum(r["epochs"] > 0 for r in records)
    print(f"{seen} of {len(records)} conversations trained on -> {paths['html']} (and cartography.png)")


def register_datamap_commands(sub) -> None:
    p = sub.add_parser("datamap", help="embed every conversation of an SFT data set and draw it in 2-D (t-SNE; "
                                       "UMAP if installed): map.png, an interactive map.html, points.jsonl; "
                                       "or, with --cartography RUN, its training-dynamics map")
    p.add_argument("data", nargs="?", default="", help="'tasks' (the task mixture) or conversation files "
                   "(.jsonl/.json, comma-separated)")
    p.add_argument("--cartography", default="", metavar="RUN", help="instead of DATA: a run trained with 'sft "
                   "--cartography' (or its cartography.jsonl); draws confidence against variability with "
                   "easy / ambiguous / hard regions: cartography.png, cartography.html")
    p.add_argument("--out", required=True, help="the directory to write the map into")
    p.add_argument("--embedder", default="minilm", help="minilm (the packaged sentence model) or a run directory "
                   "(its mean final hidden states) (default: %(default)s)")
    p.add_argument("--tasks", default="all", help="with DATA=tasks: which tasks and weights (default: %(default)s)")
    p.add_argument("--examples-per-task", type=int, default=50, help="with DATA=tasks (default: %(default)s)")
    p.add_argument("--max-examples", type=int, default=0, help="with files: at most this many per file (0: all)")
    p.add_argument("--projection", choices=("auto", "tsne", "umap"), default="auto",
                   help="auto: UMAP when umap-learn is installed, else t-SNE (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the task mixture and the projection "
                                                        "(default: %(default)s)")
    p.set_defaults(func=cmd_datamap)
