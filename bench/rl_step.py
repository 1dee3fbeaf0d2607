"""One GRPO step and one DPO step of gptstack against TRL's GRPOTrainer / DPOTrainer, same model, same run.

    .venv/bin/python bench/rl_step.py [--steps 3] [--threads 2] [--beta 0.04] [--bf16]

The model is a tiny Llama layout (4 layers, 256 wide, 4 heads, SwiGLU 704, vocab 8192, no QK-norm, untied):
our GPT and HF `LlamaForCausalLM` get the same weights (checked: equal logits). Both sides use AdamW, fp32 (bf16 autocast with --bf16),
the same prompts, the same rewards and the same KL coefficient against a frozen reference.

GRPO step: 8 prompts x 8 samples x 64 new tokens (sampling at T=1 from a near-uniform random model, so rows
run the full 64 tokens on both sides), rewards, group advantages, one policy update (plus the reference's
log-probs when --beta > 0). DPO step: 8 pairs of <= 128 tokens, policy + reference forward, one update.
Ours runs through THE training loop (`train()`), timed from its per-step metrics; TRL's through its Trainer,
timed by a callback. The first step of each is a warm-up and not counted; the median of the rest is reported.
Needs the bench extra: pip install trl (transformers, datasets come with it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

WORDS = ("the king queen lord lady love death night day sword crown heart blood fair sweet good noble speak hear "
         "see come go thou thee thy art hath doth shall will would should must may").split()


def tokenizer_8k():
    from gptstack.tokenizer import Tokenizer

    for cand in (REPO / "runs" / "base" / "tokenizer", REPO / "runs" / "sft" / "tokenizer"):
        if (cand / "meta.json").exists():
            tok = Tokenizer.load(cand)
            if tok.vocab_size == 8192:
                return tok
    from gptstack.data.corpus import load_corpus
    return Tokenizer.train((d.text for d in load_corpus("shakespeare")), 8192)


def build_models(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptstack.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=4, n_embd=256, n_head=4, n_kv_head=4, mlp_hidden=704,
                    seq_len=256, qk_norm=False, tie_embeddings=False)
    ours = GPT(cfg)
    ours.init_weights(seed)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.02)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=4 * cfg.seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         bos_token_id=tok.bos_id, eos_token_id=tok.assistant_end_id,
                         pad_token_id=tok.special("<|output_end|>"), attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected, (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, f"the two models differ: max logit difference {diff}"
    return ours, hf, cfg


def hf_tokenizer(tok):
    from tokenizers import Tokenizer as HFTok
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=HFTok.from_str(json.dumps(tok.to_hf_json())))
    t.eos_token, t.bos_token, t.pad_token = "<|assistant_end|>", "<|bos|>", "<|output_end|>"
    return t


def save_run(model, tok, cfg, path: Path) -> Path:
    from gptstack.io import atomic_write_json, save_weights

    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "model.safetensors", model.state_dict(), {"checkpoint_id": "bench"})
    tok.save(path / "tokenizer")
    atomic_write_json(path / "config.json", {"kind": "lm", "stage": "bench", "model": cfg.to_dict(), "parent_run": None})
    return path


def random_reward(seed=0):
    rng = random.Random(seed)
    return lambda n: [rng.random() for _ in range(n)]


def median_step(times: list[float]) -> float:
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


# ---- GRPO ------------------------------------------------------------------------------------------------

def ours_grpo(run: Path, tmp: Path, steps: int, beta: float, dtype: str) -> tuple[float, dict]:
    from gptstack.train.loop import train
    from gptstack.config import RLConfig
    from gptstack.train.rl import prepare_rl

    draw = random_reward(1)
    cfg = RLConfig(out=str(tmp / "ours_grpo"), algo="grpo", tasks="arithmetic_direct", n_prompts=8, samples=8,
                   max_new_tokens=64, kl_coef=beta, update_epochs=1, minibatches=1, steps=steps, log_every=1, eval_every=0, progress=False,
                   lr=1e-6, device="cpu", dtype=dtype, train_examples=64)
    setup = prepare_rl(run, cfg, reward_fn=lambda ex, p, comps: draw(len(comps)))
    train(setup.stage, setup.cfg)
    recs = [json.loads(l) for l in (tmp / "ours_grpo" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    el = [r["elapsed"] for r in recs]
    times = [el[0]] + [b - a for a, b in zip(el, el[1:])]
    return median_step(times), {"response_tokens": recs[-1]["response_tokens"], "sample_s": recs[-1]["sample_seconds"]}


class StepTimer:
    def __new__(cls):
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            def __init__(self):
                self.marks = []

            def on_train_begin(self, args, state, control, **kw):
                self.marks.append(time.time())

            def on_step_end(self, args, state, control, **kw):
                self.marks.append(time.time())

            @property
            def times(self):
                return [b - a for a, b in zip(self.marks, self.marks[1:])]
        return _T()


def trl_grpo(hf_model, hf_tok, prompts: list[str], tmp: Path, steps: int, beta: float, dtype: str
             ) -> tuple[float, dict]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    draw = random_reward(1)
    lengths = []

    def reward(completions, completion_ids=None, **kw):
        if completion_ids is not None:
            lengths.extend(len(c) for c in completion_ids)
        return draw(len(completions))

    args = GRPOConfig(model_init_kwargs={"dtype": torch.float32}, output_dir=str(tmp / "trl_grpo"), per_device_train_batch_size=64, num_generations=8,
                      max_completion_length=64, beta=beta, learning_rate=1e-6, max_steps=steps, logging_steps=1,
                      save_strategy="no", report_to="none", use_cpu=True, bf16=dtype == "bf16", disable_tqdm=True,
                      dataloader_num_workers=0, temperature=1.0, top_k=0, seed=0, shuffle_dataset=False)
    ds = Dataset.from_dict({"prompt": prompts * 8})
    timer = StepTimer()
    trainer = GRPOTrainer(model=hf_model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=hf_tok,
                          callbacks=[timer])
    trainer.train()
    return median_step(timer.times), {"response_tokens": statistics.mean(lengths) if lengths else None}


# ---- DPO -------------------------------------------------------------------------------------------------

def dpo_pairs(tok, n: int, seed=0):
    """Prompts of ~20 tokens, replies of ~40-100 tokens: every rendered pair fits in 128 tokens."""
    from gptstack.data.preference import PreferencePair

    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    pairs = []
    while len(pairs) < n:
        p = PreferencePair([{"role": "user", "content": sentence(14)}], sentence(rng.randint(40, 95)),
                           sentence(rng.randint(40, 95)))
        lens = [len(tok.render_conversation(m)[0]) for m in (p.chosen_messages(), p.rejected_messages())]
        if max(lens) <= 128:
            pairs.append(p)
    return pairs


def ours_dpo(run: Path, prefs: Path, tmp: Path, steps: int, dtype: str) -> float:
    from gptstack.config import DPOConfig
    from gptstack.train.dpo import prepare_dpo
    from gptstack.train.loop import train

    cfg = DPOConfig(out=str(tmp / "ours_dpo"), prefs=str(prefs), batch_size=8, max_len=128, beta=0.1, steps=steps,
                    val_frac=0.0, log_every=1, eval_every=10_000, progress=False, lr=1e-6, device="cpu", dtype=dtype)
    stage, cfg, _, _ = prepare_dpo(run, cfg)
    stage.evaluate = None
    train(stage, cfg)
    recs = [json.loads(l) for l in (tmp / "ours_dpo" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    el = [r["elapsed"] for r in recs]
    return median_step([el[0]] + [b - a for a, b in zip(el, el[1:])])


def trl_dpo(hf_model, hf_tok, tok, pairs, tmp: Path, steps: int, dtype: str) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # the prompt is rendered as text with our special tokens, which the exported HF tokenizer maps to the same ids
    rows = {"prompt": [tok.decode(tok.render_prompt(p.prompt)) for p in pairs],
            "chosen": [p.chosen + "<|assistant_end|>" for p in pairs],
            "rejected": [p.rejected + "<|assistant_end|>" for p in pairs]}
    args = DPOConfig(model_init_kwargs={"dtype": torch.float32}, output_dir=str(tmp / "trl_dpo"), per_device_train_batch_size=8, max_length=128, beta=0.1,
                     learning_rate=1e-6, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, bf16=dtype == "bf16", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    timer = StepTimer()
    trainer = DPOTrainer(model=hf_model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=hf_tok,
                         callbacks=[timer])
    trainer.train()
    return median_step(timer.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="steps per side (the first is a warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient on both sides")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default: fp32 on both)")
    ap.add_argument("--only", choices=["grpo", "dpo", "all"], default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = "bf16" if args.bf16 else "fp32"   # the same on both sides (our "auto" would pick bf16 on this CPU)

    from gptstack.data.preference import save_preferences
    from gptstack.data.tasks import generate_mixture

    tok = tokenizer_8k()
    ours, hf, cfg = build_models(tok)
    hf_tok = hf_tokenizer(tok)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = save_run(ours, tok, cfg, tmp / "model")
        hf.save_pretrained(tmp / "hf")          # TRL loads policy and reference from a path, as users do
        hf_tok.save_pretrained(tmp / "hf")
        hf = str(tmp / "hf")
        if args.only in ("grpo", "all"):
            examples = generate_mixture("arithmetic_direct", "train", 8, 0)
            prompts = [tok.decode(tok.render_prompt(ex.prompt_messages())) for ex in examples]
            t_ours, info_o = ours_grpo(run, tmp, args.steps, args.beta, dtype)
            t_trl, info_t = trl_grpo(hf, hf_tok, prompts, tmp, args.steps, args.beta, dtype)
            results["grpo"] = (t_ours, t_trl)
            print(f"GRPO step (8 prompts x 8 samples x 64 tokens, beta {args.beta}): gptstack {t_ours:.2f}s "
                  f"(sampling {info_o['sample_s']:.2f}s, {info_o['response_tokens']:.0f} tokens/reply)  "
                  f"TRL {t_trl:.2f}s ({info_t['response_tokens']} tokens/reply)  ->  {t_trl / t_ours:.2f}x")
        if args.only in ("dpo", "all"):
            pairs = dpo_pairs(tok, 64)
            save_preferences(pairs, tmp / "prefs.jsonl")
            t_ours = ours_dpo(run, tmp / "prefs.jsonl", tmp, args.steps, dtype)
            t_trl = trl_dpo(hf, hf_tok, tok, pairs, tmp, args.steps, dtype)
            results["dpo"] = (t_ours, t_trl)
            print(f"DPO step (8 pairs, <= 128 tokens): gptstack {t_ours:.3f}s  TRL {t_trl:.3f}s  ->  "
                  f"{t_trl / t_ours:.2f}x")
    print(json.dumps({k: {"gptstack_s": round(a, 4), "trl_s": round(b, 4), "ratio": round(b / a, 2)}
                      for k, (a, b) in results.items()}))


if __name__ == "__main__":
    main()
