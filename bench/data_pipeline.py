"""The data pipeline against its physical limit, the tokenizer, on a corpus of a size people train on.

    python bench/data_pipeline.py                       # makes a 1 GB JSONL corpus (and 1/8 of it) first
    python bench/data_pipeline.py --gigabytes 0.25 --skip_recipe

One run, side by side, on the same generated corpus, tokenizer and cores:
  raw tokenizer   backend_tokenizer.encode_batch_fast over the texts already in memory, every core
                  (Rust threads): the limit. Only the encode calls are timed.
  ours (cold)     `data.py prepare pretrain.py ...` in a fresh process with an empty cache: read,
                  tokenize in worker processes, write the token store, plan the blocks
  ours (warm)     the same command again: what every later run with the same inputs pays
  recipe          the tutorials' run_clm.py pipeline: load_dataset("json") + map(tokenize) +
                  map(group_texts) (skip with --skip_recipe: it needs about 13 bytes a token of disk)
Also: bytes per token of each cache, the peak resident memory of `ours (cold)` on the whole corpus
and on 1/8 of it (it must not grow with the corpus), the peak disk of the cache directory during the
cold build, and an SFT row: conversations/s of sft.py's data build against the chat template's
rendering and tokenization alone (one process) on the same conversations.
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from transformers import AutoTokenizer

from dstrain.arguments import ChatDataArguments
from dstrain.data.chat_template import tokenize_conversation
from dstrain.data.python_docs import documentation_chats, documentation_texts
from dstrain.data.records import iter_texts
from dstrain.data.sft import sft_datasets
from dstrain.data.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, gigabytes: float, seed: int = 0) -> None:
    """Documents of 1 to 40 paragraphs drawn from Python's documentation, until the file has the size."""
    paragraphs = [p for text in documentation_texts() for p in text.split("\n\n") if p.strip()]
    draw, target, written = random.Random(seed), int(gigabytes * 1e9), 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            line = json.dumps({"text": "\n\n".join(draw.choices(paragraphs, k=draw.randint(1, 40)))}) + "\n"
            handle.write(line)
            written += len(line.encode())


def raw_tokenizer(path: Path, tokenizer) -> tuple[int, float]:
    """Tokens and seconds of encode_batch_fast alone, batches of 1,000 documents, every core."""
    backend, tokens, seconds = tokenizer.backend_tokenizer, 0, 0.0
    batch = []
    with open(path, "rb") as handle:
        for line in handle:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                tokens, seconds = _encode(backend, batch, tokens, seconds)
                batch = []
    if batch:
        tokens, seconds = _encode(backend, batch, tokens, seconds)
    return tokens, seconds


def _encode(backend, batch, tokens, seconds):
    start = time.perf_counter()
    encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
    seconds += time.perf_counter() - start
    return tokens + sum(len(e.ids) + 1 for e in encodings), seconds  # + the eos each document gets


class DiskWatch(threading.Thread):
    """The largest size a folder reaches while it runs (sampled every 0.5 s)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.peak, self.stopped = folder, 0, threading.Event()

    def run(self):
        while not self.stopped.wait(0.5):
            self.peak = max(self.peak, folder_bytes(self.folder))

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return max(self.peak, folder_bytes(self.folder))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def prepare(corpus: Path, tokenizer_dir: Path, cache: Path, block_size: int) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, peak disk bytes) of `data.py prepare` in a fresh process. The RSS is
    the largest of any child process so far (getrusage's RUSAGE_CHILDREN): run smaller corpora first."""
    command = [sys.executable, str(REPO / "data.py"), "prepare", str(REPO / "pretrain.py"),
               "--tokenizer_name", str(tokenizer_dir), "--config_name", "tiny", "--train_files", str(corpus),
               "--block_size", str(block_size), "--validation_split_percentage", "0", "--data_cache_dir", str(cache),
               "--output_dir", str(cache / "out")]
    watch = DiskWatch(cache)
    watch.start()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    seconds = time.perf_counter() - start
    disk = watch.stop()
    if done.returncode:
        raise SystemExit(f"data.py prepare failed:\n{done.stderr[-3000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, disk


def recipe(corpus: Path, tokenizer, block_size: int, cache: Path) -> float:
    """Seconds the tutorials' pipeline takes on `corpus` (tutorial_blocks)."""
    start = time.perf_counter()
    tutorial_blocks([corpus], tokenizer, block_size, cache)
    return time.perf_counter() - start


def tutorial_blocks(corpora: list[Path], tokenizer, block_size: int, cache: Path):
    """The tutorials' pipeline (transformers' run_clm.py), kept as they write it, plus an eos a document:
    the blocks as a datasets.Dataset (bench/train_throughput.py's plain script trains on them)."""
    from datasets import load_dataset  # noqa: PLC0415 - the baseline only

    raw = load_dataset("json", data_files=[str(corpus) for corpus in corpora], split="train", cache_dir=str(cache))
    eos = tokenizer.eos_token_id

    def tokenize_function(examples):
        output = tokenizer(examples["text"], add_special_tokens=False)
        output["input_ids"] = [ids + [eos] for ids in output["input_ids"]]
        output["attention_mask"] = [mask + [1] for mask in output["attention_mask"]]
        return output

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total = len(concatenated["input_ids"]) // block_size * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=raw.column_names)
    return tokenized.map(group_texts, batched=True)


def sft_row(tokenizer, workdir: Path, conversations: int) -> tuple[float, float]:
    """(conversations/s of sft_datasets, of rendering + tokenizing alone in this process)."""
    chats = documentation_chats()
    path = workdir / "chats.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(conversations):
            handle.write(json.dumps(chats[i % len(chats)]) + "\n")
    start = time.perf_counter()
    for i in range(conversations):
        tokenize_conversation(tokenizer, chats[i % len(chats)]["messages"])
    alone = conversations / (time.perf_counter() - start)
    start = time.perf_counter()
    sft_datasets(ChatDataArguments(train_files=[str(path)], data_cache_dir=str(workdir / "sft-cache"),
                                   max_length=1024, packing=True), tokenizer, seed=0)
    return conversations / (time.perf_counter() - start), alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--block_size", type=int, default=512, help="at most 512: the tiny preset's context")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--skip_recipe", action="store_true")
    parser.add_argument("--workdir", help="keep the corpus and caches here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        big, small = workdir / "corpus.jsonl", workdir / "corpus-eighth.jsonl"
        make_corpus(big, args.gigabytes)
        make_corpus(small, args.gigabytes / 8, seed=1)
        sample = list(iter_texts([small]))[:20_000]
        train_bpe_tokenizer(iter(sample), vocab_size=args.vocab_size).save_pretrained(workdir / "tok")
        tokenizer = AutoTokenizer.from_pretrained(workdir / "tok")
        cores = len(os.sched_getaffinity(0))
        print(f"corpus {big.stat().st_size / 1e9:.2f} GB, tokenizer of {len(tokenizer):,} tokens, {cores} cores")

        os.environ.pop("TOKENIZERS_PARALLELISM", None)  # the limit uses every core
        tokens, seconds = raw_tokenizer(big, tokenizer)
        rows = [("raw tokenizer", seconds, None, None, None)]
        _, rss_small, _ = prepare(small, workdir / "tok", workdir / "ours-eighth", args.block_size)
        cold, rss, disk = prepare(big, workdir / "tok", workdir / "ours", args.block_size)
        cache_bytes = folder_bytes(workdir / "ours")
        rows.append(("ours (cold)", cold, cache_bytes, rss, disk))
        warm, _, _ = prepare(big, workdir / "tok", workdir / "ours", args.block_size)
        rows.append(("ours (warm)", warm, cache_bytes, None, None))
        if not args.skip_recipe:
            seconds_recipe = recipe(big, tokenizer, args.block_size, workdir / "recipe")
            rows.append(("recipe", seconds_recipe, folder_bytes(workdir / "recipe"), None, None))
            shutil.rmtree(workdir / "recipe", ignore_errors=True)

        print(f"{tokens:,} tokens")
        print(f"{'pipeline':<15}{'seconds':>9}{'tokens/s':>13}{'x limit':>9}{'bytes/token':>13}{'peak RSS':>11}"
              f"{'peak disk':>11}")
        for name, seconds_, size, peak_rss, peak_disk in rows:
            print(f"{name:<15}{seconds_:>9.1f}{tokens / seconds_:>13,.0f}{rows[0][1] / seconds_:>9.2f}"
                  f"{(f'{size / tokens:.2f}' if size else '-'):>13}"
                  f"{(f'{peak_rss / 2**30:.2f} GiB' if peak_rss else '-'):>11}"
                  f"{(f'{peak_disk / 2**30:.2f} GiB' if peak_disk else '-'):>11}")
        print(f"peak RSS of ours (cold): {rss / 2**30:.2f} GiB on the corpus, {rss_small / 2**30:.2f} GiB on 1/8 of it "
              f"({rss / rss_small:.2f}x); peak disk {disk / cache_bytes:.2f}x the final cache")
        ours_rate, alone_rate = sft_row(tokenizer, workdir, args.conversations)
        print(f"SFT: {ours_rate:,.0f} conversations/s built (sft_datasets, packed) against {alone_rate:,.0f}/s "
              f"rendered and tokenized alone in one process ({ours_rate / alone_rate:.2f}x)")
        print(f"this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
