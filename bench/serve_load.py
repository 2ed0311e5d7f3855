"""serve.py under load: requests/s and tokens/s with batched vs one-at-a-time generation.

    python bench/serve_load.py                                # a random-init `demo` model made here, ~2 min on 2 cores
    python bench/serve_load.py --model out/sft --requests 64 --concurrency 16 --max_tokens 64
    python bench/serve_load.py --batch_sizes 1,4,8,16         # more server settings

The same server (serve.py in a subprocess on a free loopback port) is started once per
--max_batch_size; each time the same closed-loop load runs against it: --concurrency clients,
each sending its next chat request as soon as its last one is answered, until --requests are
done. Every request asks for exactly --max_tokens new tokens (`ignore_eos`), so all runs do the
same work. The script prints requests/s, generated tokens/s and latency for each setting, as
ratios against --max_batch_size 1 (one request at a time) measured in this run.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import httpx
from openai import AsyncOpenAI

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


async def closed_loop(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients, each sending its next request when its last is answered."""
    latencies, tokens, failures = [], [], []
    next_index = iter(range(requests))
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
        async def worker():
            for i in next_index:
                start = time.perf_counter()
                try:
                    response = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        max_tokens=max_tokens, temperature=0.8, extra_body={"ignore_eos": True})
                except Exception as error:  # noqa: BLE001 - counted and reported, the load goes on
                    failures.append(repr(error))
                    continue
                latencies.append(time.perf_counter() - start)
                tokens.append(response.usage.completion_tokens)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_s": len(latencies) / seconds, "tokens_per_s": sum(tokens) / seconds,
            "p50_latency_s": statistics.median(latencies), "max_latency_s": max(latencies),
            "completed": len(latencies), "failed": len(failures), "first_failure": failures[0] if failures else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder to serve (default: a random-init demo model made here)")
    parser.add_argument("--batch_sizes", default="1,8",
                        help="serve.py --max_batch_size values; the first is the baseline")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once (the load's bound)")
    parser.add_argument("--max_tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads (OMP_NUM_THREADS)")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(args.model) if args.model else make_demo_model(Path(scratch))
        name = model.resolve().name
        print(f"Model {model}; {args.requests} chat requests of {args.max_tokens} new tokens each, "
              f"{args.concurrency} at a time, server on {args.threads} CPU thread(s)")
        results = {}
        for size in batch_sizes:
            with Server(model, size, max_queue=max(args.concurrency, size), threads=args.threads) as server:
                asyncio.run(closed_loop(server.url, name, min(args.concurrency, 4), 2, args.max_tokens))  # warm-up
                results[size] = asyncio.run(closed_loop(server.url, name, args.requests, args.concurrency,
                                                        args.max_tokens))

    base = results[batch_sizes[0]]
    print(f"\n{'max_batch_size':>14} {'req/s':>8} {'tokens/s':>9} {'p50 s':>7} {'max s':>7} {'failed':>6}"
          f" {'req/s ratio':>11} {'tokens/s ratio':>14}")
    for size, r in results.items():
        print(f"{size:>14} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['p50_latency_s']:>7.2f} "
              f"{r['max_latency_s']:>7.2f} {r['failed']:>6} {r['requests_per_s'] / base['requests_per_s']:>11.2f}"
              f" {r['tokens_per_s'] / base['tokens_per_s']:>14.2f}")
        if r["failed"]:
            print(f"    first failure: {r['first_failure']}")
    print(f"\nRatios are against max_batch_size {batch_sizes[0]} (one request at a time) in this run.")


if __name__ == "__main__":
    main()
