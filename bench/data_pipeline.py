"""Tokenize + pack throughput: pretrain.py's data pipeline against the tutorials' recipe.

    python bench/data_pipeline.py                          # ../shared/data/pretrain_*.jsonl if present
    python bench/data_pipeline.py --train_files corpus/*.jsonl --block_size 2048 --rounds 3

Both turn the same JSONL files into the same blocks of token ids with the same fast tokenizer,
and the script asserts that their blocks are identical before it times anything:
  recipe        run_clm.py's way, as the tutorials copy it: load_dataset("json"), map(tokenize),
                map(group_texts) (the one change: an eos after each document, which ours adds and
                without which documents would run together)
  ours (cold)   utils/lm_data.pretraining_datasets with an empty cache: reads with file:line
                provenance, tokenizes, packs, writes the cache and the audit's build report
  ours (warm)   the same call again: what every later run with the same inputs pays
Tokens per second are printed as ratios against the recipe measured in this run; each round
runs every mode once, with fresh caches, and the fastest round of each counts.
"""

import argparse
import contextlib
import itertools
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from datasets import load_dataset
from transformers import AutoTokenizer

from dstrain.arguments import DataArguments
from dstrain.data.blocks import pretraining_datasets
from dstrain.data.python_docs import documentation_texts
from dstrain.data.records import expand_inputs, iter_texts
from dstrain.data.tokenizer import train_bpe_tokenizer


def corpus_files(args, workdir: Path) -> list[Path]:
    shared = sorted((REPO.parent / "shared" / "data").glob("pretrain_*.jsonl"))
    if args.train_files or shared:
        return expand_inputs(args.train_files or [str(p) for p in shared])
    print("Corpus made from Python's documentation (no ../shared/data here)")
    import json

    path = workdir / "pydoc.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documentation_texts()), encoding="utf-8")
    return [path]


def recipe(files: list[Path], tokenizer, block_size: int, cache: Path):
    """The tutorials' pipeline (transformers' run_clm.py), kept as they write it."""
    raw = load_dataset("json", data_files=[str(f) for f in files], split="train", cache_dir=str(cache))
    eos = tokenizer.eos_token_id

    def tokenize_function(examples):
        output = tokenizer(examples["text"], add_special_tokens=False)
        output["input_ids"] = [ids + [eos] for ids in output["input_ids"]]
        output["attention_mask"] = [mask + [1] for mask in output["attention_mask"]]
        return output

    def group_texts(examples):
        concatenated = {k: list(itertools.chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=raw.column_names)
    return tokenized.map(group_texts, batched=True)


def ours(files: list[Path], tokenizer, block_size: int, cache: Path):
    data_args = DataArguments(train_files=[str(f) for f in files], validation_split_percentage=0,
                              data_cache_dir=str(cache))
    return pretraining_datasets(data_args, tokenizer, block_size, seed=0,
                                main_process_first=lambda **_: contextlib.nullcontext())["train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_files", nargs="*")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = corpus_files(args, workdir)
        train_bpe_tokenizer(iter_texts(files), vocab_size=args.vocab_size).save_pretrained(workdir / "tok")
        tokenizer = AutoTokenizer.from_pretrained(workdir / "tok")
        size = sum(f.stat().st_size for f in files)
        print(f"{', '.join(map(str, files))}: {size / 1e6:.2f} MB, tokenizer of {len(tokenizer)} tokens, "
              f"blocks of {args.block_size}")

        # Same blocks from both, checked before timing.
        baseline_ids = recipe(files, tokenizer, args.block_size, workdir / "check-recipe")["input_ids"]
        our_ids = ours(files, tokenizer, args.block_size, workdir / "check-ours")["input_ids"]
        assert our_ids == baseline_ids, "the two pipelines disagree"
        tokens = len(our_ids) * args.block_size
        print(f"Both give the same {len(our_ids):,} blocks ({tokens:,} tokens)")

        timings = {"recipe": [], "ours (cold)": [], "ours (warm)": []}
        for round_ in range(args.rounds):
            for mode in timings:
                # Fresh caches each round; ours (warm) reuses the one its cold run just filled.
                cache = workdir / f"{mode.split()[0]}-{round_}"
                start = time.perf_counter()
                (recipe if mode == "recipe" else ours)(files, tokenizer, args.block_size, cache)
                timings[mode].append(time.perf_counter() - start)
        seconds = {mode: min(times) for mode, times in timings.items()}
        print(f"{'pipeline':<12} {'seconds':>8} {'tokens/s':>12} {'ratio':>7}")
        for mode, s in seconds.items():
            print(f"{mode:<12} {s:>8.2f} {tokens / s:>12,.0f} {seconds['recipe'] / s:>6.2f}x")


if __name__ == "__main__":
    main()
