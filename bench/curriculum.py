"""Curriculum comparison: each cartography order against random, from the same base, on the same data, with
the same step budget and seed; greedy on the same held-out test problems, paired (exact sign test on the
problems one run solves and the other does not).

    .venv/bin/python bench/curriculum.py BASE_RUN OUT_DIR [--tasks T] [--examples-per-task N] [--steps S] [--n N]

1. `sft --cartography` in random order records the map (that run is also the random arm: same seed, same
   budget), 2. `sft --order easy-first|hard-first --cartography-from` it, 3. paired greedy evaluation.
"""

import argparse
import math
import subprocess
import sys
from pathlib import Path


def sign_test(b: int, c: int) -> float:
    """Two-sided exact binomial p for b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--tasks", default="greetings,extraction,spelling,arithmetic_direct")
    ap.add_argument("--examples-per-task", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n", type=int, default=100, help="held-out test problems per task")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    gptstack = [sys.executable, "-m", "gptstack.cli"]
    common = ["--tasks", a.tasks, "--examples-per-task", str(a.examples_per_task), "--steps", str(a.steps),
              "--minutes", "0", "--batch-size", str(a.batch_size), "--val-conversations", "0", "--no-progress",
              "--device", "cpu", "--seed", str(a.seed)]
    runs = {"random": out / "sft_random", "easy-first": out / "sft_easy-first", "hard-first": out / "sft_hard-first"}
    subprocess.run(gptstack + ["sft", a.base, "--out", str(runs["random"]), "--cartography"] + common, check=True)
    for order in ("easy-first", "hard-first"):
        subprocess.run(gptstack + ["sft", a.base, "--out", str(runs[order]), "--order", order,
                                   "--cartography-from", str(runs["random"])] + common, check=True)
    subprocess.run(gptstack + ["datamap", "--cartography", str(runs["random"]), "--out", str(out / "map")], check=True)

    from gptstack.eval.tasks import evaluate_tasks
    from gptstack.runs import load_model

    solved = {}
    for order, run in runs.items():
        model, tok, _ = load_model(run, "cpu")
        r = evaluate_tasks(model, tok, a.tasks, n=a.n, modes=["greedy"], seed=a.seed, keep_examples=a.n)
        solved[order] = {t: [e["reward"] >= 1 for e in ex] for t, ex in r["examples"].items()}
    tasks = list(solved["random"])
    print("| order | task | greedy solved | random solved | only this order | only random | sign-test p |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for order in ("easy-first", "hard-first"):
        for task in tasks + ["all"]:
            chosen = tasks if task == "all" else [task]
            x = [v for t in chosen for v in solved[order][t]]
            r = [v for t in chosen for v in solved["random"][t]]
            b = sum(u and not v for u, v in zip(x, r))
            c = sum(v and not u for u, v in zip(x, r))
            print(f"| {order} | {task} | {sum(x)}/{len(x)} | {sum(r)}/{len(r)} | {b} | {c} | {sign_test(b, c):.2g} |")


if __name__ == "__main__":
    main()
