"""Serving under load: `gptstack serve` (continuous batching) vs `transformers serve` on the same weights.

    .venv/bin/python bench/serve.py [--model tiny|smollm2] [--levels 1,8,32,64] [--seconds 20]
                                    [--max-tokens 128] [--threads 2] [--max-batch 64] [--hf-continuous-batching]

One model with fixed random weights (N(0, 0.02), seed 0): `tiny` is the tiny preset's GPT (depth 4, 256 wide,
QK-norm, 8192-token vocabulary, 256-token context), `smollm2` has SmolLM2-135M's dims (30 layers, 576 wide, 9
heads / 3 KV heads, SwiGLU 1536, tied embeddings, RoPE theta 1e5, 2048 context) but our 8192-token vocabulary.
The same weights are saved twice: as a gptstack run directory (served by the real `gptstack serve` command)
and as a transformers model directory (Qwen3ForCausalLM when QK-norm is on, else LlamaForCausalLM; logits
checked equal; our tokenizer as an HF fast tokenizer whose chat template renders our prompt ids), served by
`transformers serve DIR` — HF's own OpenAI-compatible server. It runs offline here (HF_HUB_OFFLINE=1, a local
directory). Its default path runs one `model.generate()` at a time on one inference thread, which is what a
user of `transformers serve` gets (its streams begin with the prompt's text echoed back as a content chunk,
which the client here skips: time to first token is the first generated token on both sides); `--hf-continuous-batching` passes its `--continuous-batching` (paged
attention) instead (on this CPU it was far slower: see RESULTS.md).

With `--llama-server PATH` (a llama.cpp `llama-server` binary; without it that server is skipped, saying so) a
third server runs on the same weights: the run written by our GGUF exporter as f32 (so the weights are bit for
bit ours) and served by `llama-server -m F.gguf` with the same threads (`-t`/`-tb`), one slot per client of the
highest level (`--parallel N`, context N x the model's context, so each slot has the model's whole context;
continuous batching is llama.cpp's default), its Jinja engine rendering the chat template stored in the GGUF.

Before the load, each server answers one greedy, non-streaming request for the same prompt; the texts are
printed and compared with ours (same weights, greedy: they should agree, at least for the first tokens: the
servers' different f32 summation orders can flip a near-tie later on).

Each server is a subprocess with the same torch threads (--threads; OMP_NUM_THREADS for both) and fp32. The
load generator (this process: httpx, parsing the server-sent events itself — lighter than the `openai`
client's objects per chunk, so it takes less of the machine from the servers) runs N concurrent clients for --seconds
each level: each client sends a streaming chat request (temperature 0, --max-tokens, a distinct ~25-token
prompt), reads it to the end, and sends the next, until the time is up; requests in flight then finish and
count. Greedy decoding on identical weights gives every server the same tokens to produce. Reported per level:
requests/s and output tokens/s (usage.completion_tokens over the wall time until the last request finished),
p50/p99 time to first token (request sent -> first content chunk), p50/p99 inter-token latency (gaps between
content chunks of a request), and errors (must be 0). Then the ratios ours / transformers and ours / llama.cpp.

The servers share the machine with the load generator (2 cores here), as they would with a co-located
client; none is favoured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = ("the king queen lord lady love death night day sword crown heart blood fair sweet good noble speak hear "
         "see come go thou thee thy art hath doth shall will would should must may honour grief tongue eye hand "
         "father mother brother son daughter friend enemy war peace heaven earth fortune").split()


# ---- the model, saved for both servers --------------------------------------------------------------------

def model_config(name: str, vocab: int):
    from gptstack.model.gpt import GPTConfig, model_config_from_depth

    if name == "tiny":
        return model_config_from_depth(4, vocab, 256)
    if name == "smollm2":
        return GPTConfig(vocab_size=vocab, n_layer=30, n_embd=576, n_head=9, n_kv_head=3, mlp_hidden=1536,
                         seq_len=2048, rope_theta=100000.0, qk_norm=False, tie_embeddings=True)
    raise SystemExit(f"--model must be tiny or smollm2, got {name!r}")


def find_tokenizer(path: str, vocab: int):
    """--tokenizer, else the tokenizer `gptstack pretrain` trained and cached for this vocabulary size."""
    from gptstack.data.corpus import gptstack_home
    from gptstack.tokenizer import Tokenizer

    if path:
        return Tokenizer.load(path)
    cached = sorted((gptstack_home() / "tokenizers").glob(f"*-{vocab}"))
    cached = [c for c in cached if (c / "meta.json").exists()]
    if not cached:
        raise SystemExit(f"no cached {vocab}-token tokenizer: run `gptstack tokenizer train --vocab-size {vocab} "
                         "--out runs/tok` and pass --tokenizer runs/tok")
    return Tokenizer.load(cached[0])


def build(args, work: Path):
    import torch

    from _hf import check_same_logits, make_models, save_hf_dir
    from gptstack.io import atomic_write_json, save_weights

    tok = find_tokenizer(args.tokenizer, 8192)
    cfg = model_config(args.model, tok.vocab_size)
    ours, hf = make_models(cfg, seed=0)
    check_same_logits(ours, hf, torch.tensor([tok.render_prompt([{"role": "user", "content": "Good night"}])]))
    run = work / "bench"
    run.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in ours.state_dict().items() if not k.startswith("rope_")}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_weights(run / "model.safetensors", state, {"checkpoint_id": "bench-serve"})
    atomic_write_json(run / "config.json", {"model": cfg.to_dict(), "stage": "bench"})
    tok.save(run / "tokenizer")
    hf_dir = save_hf_dir(hf, tok, work / "hf")
    params = sum(p.numel() for p in ours.parameters())
    return tok, cfg, run, hf_dir, params


def prompts(tok, n: int, seed: int = 0) -> list[list[dict]]:
    """Distinct user messages of ~20 words (so the prefix cache shares only the chat template's first tokens)."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(20))}] for i in range(n)]


# ---- servers ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], model: str, port: int, threads: int, log: Path):
        self.name, self.model, self.port = name, model, port
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error"}
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{self.name} did not come up in {timeout:.0f} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# transformers serve (5.24) streams the rendered prompt back as its first content chunk, before generating;
# it is skipped, so that time to first token is the first *generated* token on both sides
ECHO = "<|bos|>"


# ---- load -------------------------------------------------------------------------------------------------

async def one_request(http, url: str, model: str, messages, max_tokens: int, retried: list | None = None) -> dict:
    """One streaming chat request over plain httpx (server-sent events parsed here: a light client, so the
    load generator takes as little of the machine from the servers as it can). A kept-alive connection that
    the server closed before any response (llama-server's HTTP library does, now and then) is retried once, as
    HTTP clients do (counted in `retried`); TTFT still counts from the first attempt."""
    import httpx

    t0 = time.perf_counter()
    try:
        return await _one_request(http, url, model, messages, max_tokens, t0)
    except httpx.RemoteProtocolError as e:
        if "without sending a response" not in str(e):
            raise
        if retried is not None:
            retried.append(1)
        return await _one_request(http, url, model, messages, max_tokens, t0)


async def _one_request(http, url: str, model: str, messages, max_tokens: int, t0: float) -> dict:
    stamps, usage = [], None
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(f"error in the stream: {ch['error']}")
            text = ch["choices"][0]["delta"].get("content") if ch.get("choices") else None
            if text:
                if not stamps and text.startswith(ECHO):   # transformers serve's echo of the prompt: not output
                    continue
                stamps.append(time.perf_counter())
            if ch.get("usage"):
                usage = ch["usage"]["completion_tokens"]
    if not stamps:
        raise RuntimeError("no content streamed")
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": usage if usage is not None else len(stamps), "end": time.perf_counter()}


async def run_level(server: Server, clients: int, seconds: float, max_tokens: int, pool) -> dict:
    import httpx

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8),
                             timeout=httpx.Timeout(900.0))
    done: list[dict] = []
    errors: list[str] = []
    retried: list[int] = []
    counter = iter(range(10 ** 9))
    start = time.perf_counter()
    deadline = start + seconds

    async def worker():
        while time.perf_counter() < deadline:
            msgs = pool[next(counter) % len(pool)]
            try:
                done.append(await one_request(http, server.url, server.model, msgs, max_tokens, retried))
            except Exception as e:   # counted, and the client goes on
                errors.append(f"{type(e).__name__}: {e}"[:200])

    await asyncio.gather(*[worker() for _ in range(clients)])
    end = max([d["end"] for d in done], default=time.perf_counter())
    await http.aclose()
    wall = end - start
    ttft = sorted(d["ttft"] for d in done)
    itl = sorted(x for d in done for x in d["itl"])
    tokens = sum(d["tokens"] for d in done)
    return {"server": server.name, "clients": clients, "requests": len(done), "errors": len(errors),
            "error_examples": errors[:3], "retried": len(retried), "wall_s": wall, "req_s": len(done) / wall, "tok_s": tokens / wall,
            "tokens": tokens, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def warm_up(server: Server, pool, max_tokens: int) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=900) as http:
        await one_request(http, server.url, server.model, pool[-1], 8)
        await asyncio.gather(*[one_request(http, server.url, server.model, pool[-2 - i], max_tokens // 4)
                               for i in range(4)])


# the prompt every server answers greedily before its load, to show that they produce the same tokens
CHECK_PROMPT = [{"role": "user", "content": "Speak, good lord: what of the crown and the queen?"}]


def greedy_text(server: Server, max_tokens: int = 32) -> str:
    import httpx

    body = {"model": server.model, "messages": CHECK_PROMPT, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    if r.status_code != 200:
        raise SystemExit(f"{server.name}: the greedy check got HTTP {r.status_code}: {r.text[:300]}")
    text = r.json()["choices"][0]["message"]["content"] or ""
    return text[len(ECHO):] if text.startswith(ECHO) else text


def bench_server(server: Server, levels, seconds, max_tokens, pool, greedy: dict) -> list[dict]:
    server.wait()
    try:
        greedy[server.name] = greedy_text(server)
        print(f"{server.name} greedy: {greedy[server.name]!r}", flush=True)
        asyncio.run(warm_up(server, pool, max_tokens))
        rows = []
        for n in levels:
            row = asyncio.run(run_level(server, n, seconds, max_tokens, pool))
            print(fmt(row), flush=True)
            rows.append(row)
        return rows
    finally:
        server.stop()


def fmt(r: dict) -> str:
    return (f"{r['server']:<22} {r['clients']:>3} clients: {r['req_s']:6.2f} req/s  {r['tok_s']:8.1f} tok/s  "
            f"TTFT p50 {1e3 * r['ttft_p50']:8.1f} p99 {1e3 * r['ttft_p99']:8.1f} ms  "
            f"ITL p50 {1e3 * r['itl_p50']:7.2f} p99 {1e3 * r['itl_p99']:7.2f} ms  "
            f"errors {r['errors']}  ({r['requests']} requests, {r['wall_s']:.1f} s"
            + (f", {r['retried']} retried once)" if r["retried"] else ")"))


def agreement(a: str, b: str) -> str:
    """How far two greedy texts agree: equal, or the common prefix's length (characters) and where they part."""
    if a == b:
        return f"identical ({len(a)} characters)"
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return f"agree on the first {n} of {len(a)} / {len(b)} characters, then {a[n:n + 12]!r} vs {b[n:n + 12]!r}"


def llama_server_cmd(binary: str, gguf: Path, port: int, threads: int, slots: int, slot_context: int) -> list[str]:
    """llama.cpp's server on the GGUF: our threads, one slot per client of the highest level, each slot the
    model's whole context (-c is split evenly across slots), Jinja chat templates, no web page."""
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb",
            str(threads), "--parallel", str(slots), "-c", str(slots * slot_context), "--alias", "bench", "--jinja",
            "--no-webui", "--cont-batching"]


def ratios(name: str, ours: dict, ref: dict, levels) -> None:
    print(f"\nours / {name}:")
    for n in levels:
        if n not in ours or n not in ref:
            continue
        o, h = ours[n], ref[n]
        print(f"  {n:>3} clients: output tok/s {o['tok_s'] / h['tok_s']:6.2f}x   req/s "
              f"{o['req_s'] / h['req_s']:6.2f}x   TTFT p50 {h['ttft_p50'] / o['ttft_p50']:6.2f}x lower   "
              f"ITL p99 {h['itl_p99'] / o['itl_p99']:6.2f}x lower")
    if 32 in ours and 32 in ref:
        print(f"  output tok/s at 32 clients, ours / {name} = {ours[32]['tok_s'] / ref[32]['tok_s']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (the tiny preset's GPT) or smollm2 (SmolLM2-135M dims)")
    ap.add_argument("--levels", default="1,8,32,64", help="concurrent clients, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="load time per level")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--max-batch", type=int, default=64, help="gptstack serve --max-batch")
    ap.add_argument("--tokenizer", default="", help="tokenizer directory (default: the cached 8192-token one)")
    ap.add_argument("--only", default="", help="ours, hf or llama: run one server only (no ratios)")
    ap.add_argument("--llama-server", default="", metavar="PATH",
                    help="llama.cpp's llama-server binary: also serve the weights with it (GGUF, f32)")
    ap.add_argument("--hf-continuous-batching", action="store_true", help="transformers serve --continuous-batching")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a killed bench still stops its servers
    levels = [int(x) for x in args.levels.split(",")]
    if args.only not in ("", "ours", "hf", "llama"):
        raise SystemExit(f"--only must be ours, hf or llama, got {args.only!r}")
    if args.llama_server and not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
        raise SystemExit(f"--llama-server {args.llama_server!r} is not an executable file")
    if args.only == "llama" and not args.llama_server:
        raise SystemExit("--only llama needs --llama-server PATH")

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        tok, cfg, run, hf_dir, params = build(args, work)
        pool = prompts(tok, 512)
        lens = [len(tok.render_prompt(m)) for m in pool]
        print(f"model {args.model}: {params / 1e6:.1f} M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, "
              f"vocab {cfg.vocab_size}, context {cfg.seq_len}; prompts {min(lens)}-{max(lens)} tokens, "
              f"max_tokens {args.max_tokens}, temperature 0; {args.seconds:.0f} s per level; "
              f"threads {args.threads}; machine {os.cpu_count()} CPUs", flush=True)
        exe = str(Path(sys.executable).parent)
        rows: list[dict] = []
        greedy: dict[str, str] = {}
        if args.only in ("", "ours"):
            port = free_port()
            cmd = [f"{exe}/gptstack", "serve", str(run), "--port", str(port), "--device", "cpu", "--threads",
                   str(args.threads), "--max-batch", str(args.max_batch), "--max-queue", str(4 * max(levels)),
                   "--model-name", "bench"]
            rows += bench_server(Server("gptstack serve", cmd, "bench", port, args.threads, work / "ours.log"),
                                 levels, args.seconds, args.max_tokens, pool, greedy)
        if args.only in ("", "hf"):
            port = free_port()
            cmd = [f"{exe}/transformers", "serve", str(hf_dir), "--port", str(port), "--host", "127.0.0.1",
                   "--device", "cpu", "--dtype", "float32", "--log-level", "error"]
            name = "transformers serve"
            if args.hf_continuous_batching:
                cmd.append("--continuous-batching")
                name += " CB"
            rows += bench_server(Server(name, cmd, str(hf_dir), port, args.threads, work / "hf.log"),
                                 levels, args.seconds, args.max_tokens, pool, greedy)
        if args.only in ("", "llama"):
            if not args.llama_server:
                print("llama.cpp's server: skipped (no --llama-server PATH given)", flush=True)
            else:
                from gptstack.export.gguf import export_gguf

                gguf = export_gguf(run, work / "bench.gguf", "f32")
                port = free_port()
                cmd = llama_server_cmd(args.llama_server, gguf, port, args.threads, max(levels), cfg.seq_len)
                print("llama.cpp: " + " ".join(cmd), flush=True)
                rows += bench_server(Server("llama.cpp server", cmd, "bench", port, args.threads, work / "llama.log"),
                                     levels, args.seconds, args.max_tokens, pool, greedy)
        if "gptstack serve" in greedy:
            for name, text in greedy.items():
                if name != "gptstack serve":
                    print(f"greedy check, {name} vs gptstack serve: {agreement(text, greedy['gptstack serve'])}")
        ours = {r["clients"]: r for r in rows if r["server"] == "gptstack serve"}
        ref = {r["clients"]: r for r in rows if r["server"].startswith("transformers serve")}
        cpp = {r["clients"]: r for r in rows if r["server"] == "llama.cpp server"}
        if ours and ref:
            ratios(ref[min(ref)]["server"], ours, ref, levels)
        if ours and cpp:
            ratios("llama.cpp server", ours, cpp, levels)
        if cpp and 1 in cpp and 32 in cpp:
            print(f"llama.cpp server's p99 ITL at 32 clients / at 1 client = "
                  f"{cpp[32]['itl_p99'] / cpp[1]['itl_p99']:.2f}x")
        if ours and 1 in ours and 32 in ours:
            growth = ours[32]["itl_p99"] / ours[1]["itl_p99"]
            print(f"goal: our p99 ITL at 32 clients / at 1 client = {growth:.2f}x (goal <= 2x: "
                  f"{'met' if growth <= 2 else 'NOT met'})")
        if ours and ref and 32 in ours and 32 in ref:
            ratio = ours[32]["tok_s"] / ref[32]["tok_s"]
            print(f"goal: output tok/s at 32 clients, ours / transformers = {ratio:.2f}x (goal >= 3x: "
                  f"{'met' if ratio >= 3 else 'NOT met'})")
        errors = sum(r["errors"] for r in rows)
        print(f"errors: {errors}" + ("" if not errors else f"  e.g. {[r['error_examples'] for r in rows]}"))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
