"""What the contamination check (--decontaminate_against) adds to building the training data: its
throughput on a corpus against the fast tokenizer's on the same texts, measured in the same run (the
tokenizer is what building the data costs anyway: dstrain/data/blocks.py).

    python bench/contamination.py                        # Python's docs, repeated to --repeat copies
    python bench/contamination.py --benchmarks python_local mmlu_test.jsonl --repeat 20

The benchmark side defaults to the shipped tasks (python_local: about 550 items); each training
document is checked against every 13-gram of every item.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from dstrain.data.python_docs import documentation_texts
from dstrain.data.records import iter_texts
from dstrain.data.tokenizer import train_bpe_tokenizer
from dstrain.eval.contamination import ContaminationFilter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", nargs="+", default=["python_local"])
    parser.add_argument("--repeat", type=int, default=10, help="copies of Python's documentation topics")
    parser.add_argument("--ngram", type=int, default=13)
    args = parser.parse_args()

    texts = documentation_texts() * args.repeat
    records = [{"text": text, "source": f"docs:{i}"} for i, text in enumerate(texts)]
    megabytes = sum(len(text.encode()) for text in texts) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "docs.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in documentation_texts()))
        tokenizer = train_bpe_tokenizer(iter_texts([corpus]), vocab_size=4096)

    check = ContaminationFilter(args.benchmarks, n=args.ngram)
    started = time.perf_counter()
    check.keep(records[0], False)  # reads the benchmarks and builds the index
    index_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for start in range(0, len(texts), 1000):  # the data pipeline's own tokenizing: batches of 1,000
        tokenizer.backend_tokenizer.encode_batch(texts[start:start + 1000], add_special_tokens=False)
    tokenize_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for record in records[1:]:
        check.keep(record, False)
    check_seconds = time.perf_counter() - started

    report = check.report()
    print(f"corpus: {len(texts):,} documents, {megabytes:.1f} MB; benchmarks {', '.join(args.benchmarks)}: "
          f"{sum(b['items'] for b in report['benchmarks'].values()):,} items, index built in {index_seconds:.2f} s")
    print(f"tokenizer (baseline): {megabytes / tokenize_seconds:8.1f} MB/s")
    print(f"contamination check : {megabytes / check_seconds:8.1f} MB/s  "
          f"({check_seconds / tokenize_seconds:.2f}x the tokenizer's time; "
          f"{report['contaminated']['train']:,} documents overlap)")


if __name__ == "__main__":
    main()
