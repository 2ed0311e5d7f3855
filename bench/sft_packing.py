"""Packing vs padding for chat SFT: useful-token fraction and training throughput.

    python bench/sft_packing.py                                  # ../shared/data/sft_*.jsonl if present
    python bench/sft_packing.py --train_files my_chats.jsonl --max_length 1024 --conversations 256

The same conversations, the same model and the same optimizer are trained three ways:
  pad-to-max   every conversation padded to max_length (what the seed tutorials do)
  pad-longest  dynamic padding to the longest of each batch (sft.py without --packing)
  packed       conversations packed into rows of max_length, padding-free (sft.py --packing)
and the script prints, for each, the fraction of non-padding tokens per batch and the
non-padding tokens trained per second, as ratios against pad-to-max measured in this run.
"""

import argparse
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from dstrain.data.chat_format import iter_conversations
from dstrain.data.chat_template import IGNORE, tokenize_conversation
from dstrain.data.python_docs import documentation_chats, documentation_texts
from dstrain.data.records import expand_inputs
from dstrain.data.sft import PackedRowsCollator, fit_to_length, pack_into_rows
from dstrain.data.tokenizer import train_bpe_tokenizer
from dstrain.model.config import derive_model_config


def load_conversations(args) -> list[list[dict]]:
    shared = sorted((REPO.parent / "shared" / "data").glob("sft_*.jsonl"))
    if args.train_files or shared:
        files = expand_inputs(args.train_files or [str(p) for p in shared])
        print(f"Conversations from {', '.join(map(str, files))}")
        return list(iter_conversations(files))
    print("Conversations made from Python's documentation (no ../shared/data here)")
    return [chat["messages"] for chat in documentation_chats()]


def batches(mode: str, examples: list[tuple[list[int], list[int]]], args, tokenizer) -> list[dict]:
    if mode == "packed":
        rows = []
        for row in pack_into_rows([len(ids) for ids, _ in examples], args.max_length):
            rows.append({"input_ids": [t for i in row for t in examples[i][0]],
                         "labels": [t for i in row for t in examples[i][1]],
                         "position_ids": [p for i in row for p in range(len(examples[i][0]))]})
        collate, items, size = PackedRowsCollator(tokenizer.pad_token_id), rows, args.rows_per_batch
    else:
        padding = "max_length" if mode == "pad-to-max" else "longest"
        collate = DataCollatorForSeq2Seq(tokenizer, padding=padding, max_length=args.max_length,
                                         label_pad_token_id=IGNORE)
        items = [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in examples]
        # One conversation per row and as many rows as a packed batch has: the same memory bound.
        size = args.rows_per_batch
    return [collate(items[i:i + size]) for i in range(0, len(items), size)]


def train_seconds(batches_: list[dict], model_config, seed: int) -> float:
    """Wall time of one training pass (forward, backward, AdamW step) over the batches."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(**batches_[0]).loss.backward()  # warm-up, not timed
    optimizer.zero_grad()
    start = time.perf_counter()
    for batch in batches_:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_files", nargs="*")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--conversations", type=int, default=192)
    parser.add_argument("--rows_per_batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per mode; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokenizer = train_bpe_tokenizer(iter(documentation_texts()), vocab_size=4096)
    model_config = derive_model_config(tokenizer, "demo", overrides=f"max_position_embeddings={args.max_length}")
    conversations = load_conversations(args)[: args.conversations]
    examples = [fitted for fitted in (fit_to_length(*tokenize_conversation(tokenizer, c), args.max_length)
                                      for c in conversations) if fitted]
    print(f"{len(examples)} conversations, {sum(len(ids) for ids, _ in examples):,} tokens, "
          f"max_length {args.max_length}, {args.rows_per_batch} rows per batch, demo model (2.3M parameters)")

    modes = {mode: batches(mode, examples, args, tokenizer) for mode in ("pad-to-max", "pad-longest", "packed")}
    useful = {mode: sum(int((b["input_ids"] != tokenizer.pad_token_id).sum()) for b in bs) for mode, bs in modes.items()}
    fraction = {mode: useful[mode] / sum(b["input_ids"].numel() for b in bs) for mode, bs in modes.items()}
    # Modes alternate over the rounds and the fastest pass of each counts, so a busy machine
    # slows every mode alike instead of whichever happened to run at the wrong moment.
    timings = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            timings[mode].append(train_seconds(modes[mode], model_config, args.seed))
    seconds = {mode: min(times) for mode, times in timings.items()}
    speed = {mode: useful[mode] / seconds[mode] for mode in modes}
    print(f"{'mode':<12} {'batches':>8} {'non-pad fraction':>17} {'ratio':>7} {'non-pad tokens/s':>17} {'ratio':>7}")
    for mode in modes:
        print(f"{mode:<12} {len(modes[mode]):>8} {fraction[mode]:>17.3f} {fraction[mode] / fraction['pad-to-max']:>6.2f}x "
              f"{speed[mode]:>17,.0f} {speed[mode] / speed['pad-to-max']:>6.2f}x")

if __name__ == "__main__":
    main()
