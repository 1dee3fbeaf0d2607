"""Data commands: `gptstack data notes PATH... --out notes.jsonl` (your notes and activity logs -> conversations)."""

from __future__ import annotations


def cmd_notes(args) -> None:
    from ..data.notes import write_notes

    result = write_notes(args.paths, args.out, fmt=args.format, skip_bad=args.skip_bad,
                         session_gap=args.session_gap * 60, max_steps=args.max_steps)
    files = sum(result.files.values())
    by_format = ", ".join(f"{n} {k}" for k, n in sorted(result.files.items()))
    kinds = ", ".join(f"{n} {k}" for k, n in result.kinds().items())
    print(f"read {files} file{'s' * (files != 1)} ({by_format})")
    print(f"wrote {len(result.conversations)} conversations ({kinds}) -> {args.out}")
    if result.skipped:
        reasons: dict[str, list[str]] = {}
        for where, reason in result.skipped:
            reasons.setdefault(reason, []).append(where)
        shown = "; ".join(f"{len(w)} {r} ({', '.join(w[:3])}{', ...' if len(w) > 3 else ''})"
                          for r, w in reasons.items())
        print(f"skipped {len(result.skipped)}: {shown}")


def register_data_commands(sub) -> None:
    p = sub.add_parser("data", help="make training data: notes and activity logs -> conversations")
    data = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND",
                            help="what to read: notes (the only one so far)")
    n = data.add_parser("notes", help="Markdown / Logseq outlines, plain text and activity logs (JSONL) -> "
                                      "conversations JSONL (Q/A pairs and tool-call trajectories); see docs/notes.md")
    n.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (read recursively: .md .markdown "
                   ".txt .text .jsonl .ndjson)")
    n.add_argument("--out", required=True, help="the conversations JSONL to write (atomically)")
    n.add_argument("--format", choices=("auto", "markdown", "logseq", "text", "activity"), default="auto",
                   help="how to read every file; auto: by suffix (.jsonl/.ndjson: activity, .md: markdown or "
                        "logseq, else text) (default: %(default)s)")
    n.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable files and bad log lines "
                   "instead of stopping at the first")
    n.add_argument("--session-gap", type=float, default=30.0, metavar="MINUTES",
                   help="a pause longer than this starts a new activity session (default: %(default)s)")
    n.add_argument("--max-steps", type=int, default=32, metavar="N",
                   help="tool calls per trajectory at most; a longer session continues in the next (default: %(default)s)")
    n.set_defaults(func=cmd_notes)
