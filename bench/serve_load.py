"""serve.py under load from streaming chat clients: generated tokens/s with continuous batching against
one-at-a-time generation, and time to first token (p50, p95), in one run.

    python bench/serve_load.py                                # a random-init `demo` model made here, ~2 min on 2 cores
    python bench/serve_load.py --model out/sft --requests 64 --concurrency 8,16 --max_tokens 64
    python bench/serve_load.py --no_stream                    # the same load without streaming

The baseline is serve.py with --max_batch_size 1 (one request at a time) under the first --concurrency;
then serve.py with --max_batch_size set to the largest --concurrency runs the same load at each
--concurrency (each a subprocess on a free loopback port). The load is closed-loop: N clients, each
sending its next chat request as soon as its last one has streamed to its end, until --requests are done.
Every request asks for exactly --max_tokens new tokens (`ignore_eos`), so all runs do the same work.
Printed per run: requests/s, generated tokens/s and its ratio to the baseline, and the time from sending
a request to its first streamed token (p50, p95).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import httpx
import psutil

from dstrain.data.python_docs import documentation_chats, documentation_texts
from dstrain.distributed import free_port

QUESTIONS = [chat["messages"][0]["content"] for chat in documentation_chats()[:64]]


def make_demo_model(folder: Path) -> Path:
    """A tokenizer trained on Python's docs and a random-init `demo` model (2.3M parameters): the
    throughput of generation does not depend on what the weights say."""
    from dstrain.data.tokenizer import train_bpe_tokenizer

    tokenizer_dir, model_dir = folder / "tok", folder / "model"
    train_bpe_tokenizer(documentation_texts(), vocab_size=4096).save_pretrained(tokenizer_dir)
    subprocess.run([sys.executable, str(REPO / "init_model.py"), "--tokenizer_name", str(tokenizer_dir),
                    "--config_name", "demo", "--output_dir", str(model_dir)], check=True, capture_output=True)
    return model_dir


class Server:
    def __init__(self, model: Path, max_batch_size: int, max_queue: int, threads: int):
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), "--model", str(model), "--port", str(self.port),
             "--max_batch_size", str(max_batch_size), "--max_queue", str(max_queue), "--log_level", "warning"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"serve.py exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("serve.py did not start in 180 s")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=60)


def server_cpu(server: "Server") -> float:
    """CPU seconds the server process has used, every thread: what it costs whatever else runs on the machine."""
    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def closed_loop(url: str, model: str, requests: int, concurrency: int, max_tokens: int, stream: bool) -> dict:
    """`concurrency` clients, each sending its next request when its last is answered. The clients read the
    server-sent events with httpx and parse only what they measure (the `openai` client's per-chunk objects
    cost ~160 us each, which on a 2-core machine the server's own work would pay for)."""
    first_token, tokens, failures = [], [], []
    next_index = iter(range(requests))
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def one(i: int) -> None:
            start = time.perf_counter()
            body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True}
            if not stream:
                response = await client.post("/chat/completions", json=body)
                response.raise_for_status()
                first_token.append(time.perf_counter() - start)  # the whole answer is the first token's arrival
                tokens.append(response.json()["usage"]["completion_tokens"])
                return
            first, usage = None, None
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if first is None:
                        choices = json.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            first = time.perf_counter() - start
                    elif '"choices": []' in line:  # the last chunk: the usage alone
                        usage = json.loads(line[6:])["usage"]
            first_token.append(first)
            tokens.append(usage["completion_tokens"])

        async def worker():
            for i in next_index:
                try:
                    await one(i)
                except Exception as error:  # noqa: BLE001 - counted and reported, the load goes on
                    failures.append(repr(error))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        seconds = time.perf_counter() - start
    done = [t for t in first_token if t is not None]
    if not done:
        raise SystemExit(f"every request failed: {failures[0] if failures else 'no first token'}")
    return {"seconds": seconds, "requests_per_s": len(tokens) / seconds, "tokens_per_s": sum(tokens) / seconds,
            "ttft_p50_s": percentile(done, 0.5), "ttft_p95_s": percentile(done, 0.95),
            "completed": len(tokens), "failed": len(failures), "first_failure": failures[0] if failures else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder to serve (default: a random-init demo model made here)")
    parser.add_argument("--concurrency", default="8,16", help="streaming clients at once, one run for each")
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--max_tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--no_stream", action="store_true", help="plain (non-streamed) requests instead")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    stream = not args.no_stream

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(args.model) if args.model else make_demo_model(Path(scratch))
        name = model.resolve().name
        print(f"Model {model}; {args.requests} {'streamed ' if stream else ''}chat requests of {args.max_tokens} new "
              f"tokens each per run, server on {args.threads} CPU thread(s)")
        runs = [("one at a time", 1, levels[0])] + [("continuous", max(levels), level) for level in levels]
        results = []
        for label, batch, level in runs:
            with Server(model, batch, max_queue=max(levels), threads=args.threads) as server:
                asyncio.run(closed_loop(server.url, name, min(level, 4), 2, args.max_tokens, stream))  # warm-up
                before, cpu_before = httpx.get(f"{server.url}/health").json(), server_cpu(server)
                result = asyncio.run(closed_loop(server.url, name, args.requests, level, args.max_tokens, stream))
                after, cpu = httpx.get(f"{server.url}/health").json(), server_cpu(server) - cpu_before
                result["cpu_ms_per_token"] = 1000 * cpu / max(1, result["tokens_per_s"] * result["seconds"])
                result["mean_rows"] = ((after["rows_decoded"] - before["rows_decoded"])
                                       / max(1, after["steps"] - before["steps"]))
                results.append((label, batch, level, result))

    base = results[0][3]
    print(f"\n{'server':>14} {'batch':>5} {'clients':>7} {'req/s':>7} {'tokens/s':>9} {'ratio':>6} "
          f"{'TTFT p50 s':>10} {'TTFT p95 s':>10} {'mean rows':>9} {'CPU ms/token':>12} {'CPU ratio':>9} {'failed':>6}")
    for label, batch, level, r in results:
        print(f"{label:>14} {batch:>5} {level:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>5.2f}x {r['ttft_p50_s']:>10.3f} {r['ttft_p95_s']:>10.3f} "
              f"{r['mean_rows']:>9.1f} {r['cpu_ms_per_token']:>12.2f} "
              f"{base['cpu_ms_per_token'] / r['cpu_ms_per_token']:>8.2f}x {r['failed']:>6}")
        if r["failed"]:
            print(f"    first failure: {r['first_failure']}")
    print(f"\nRatios are against one request at a time (--max_batch_size 1) in this run"
          f"{'' if stream else ' (not streamed: TTFT is the whole answer)'}: tokens/s, and the server's CPU time "
          "per generated token (all its threads), which other work on the machine does not change. Mean rows: "
          "the rows of the average decoding step.")


if __name__ == "__main__":
    main()
