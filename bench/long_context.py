"""The longest sequence that trains, and its tokens/s: the llama-1b preset (~1B, TinyLlama's shape) on one
GPU and on every GPU of the node, with and without sequence parallelism and ALST's tiled MLP and loss.

    python bench/long_context.py                          # 1 GPU and every GPU of this node
    python bench/long_context.py --configs 1gpu 1gpu_tiled --start 8192 --limit 262144
    python bench/long_context.py --train_files corpus/*.jsonl --attn_implementation flash_attention_2

Each trial is a short pretrain.py run (`deepspeed --num_gpus G`, ZeRO-3, bf16, activation checkpointing,
one sequence per rank, --steps optimizer steps) at one --block_size, in its own process, so that running
out of GPU memory ends the trial, not the benchmark. Per configuration the length doubles from --start
while it trains, then bisects between the longest that trained and the shortest that did not, down to
1,024 tokens (x the sequence-parallel size where that does not divide 1,024). A trial that fails for
another reason than memory stops the benchmark with its error. The table gives the longest length and
what the monitoring logged at its last step: tokens/s (all GPUs, each token once) and the peak memory of
the fullest GPU. The model's positions are raised to the block size (--max_position_embeddings): memory
and speed do not depend on what the positions mean.

Configurations (N = every GPU of the node):
    1gpu            1 GPU, whole sequences
    1gpu_tiled      1 GPU, --tiled_mlp --tiled_loss
    Ngpu_dp         N GPUs, data parallel (whole sequences per GPU; ZeRO-3 shards the model over N)
    Ngpu_sp         N GPUs, --sequence_parallel_size N (each GPU holds 1/N of every sequence)
    Ngpu_sp_tiled   the same with --tiled_mlp --tiled_loss
Needs CUDA GPUs: without one it stops at once with one line.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OUT_OF_MEMORY = ("out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")

CONFIGS = {  # name: (GPUs: one or all, sequence-parallel over all of them, tiled MLP and loss)
    "1gpu": ("one", False, False),
    "1gpu_tiled": ("one", False, True),
    "Ngpu_dp": ("all", False, False),
    "Ngpu_sp": ("all", True, False),
    "Ngpu_sp_tiled": ("all", True, True),
}


def longest_that_fits(fits, start: int, limit: int, quantum: int) -> tuple[int, bool]:
    """The longest multiple of `quantum` up to `limit` for which `fits(length)` holds, assuming that what
    fits at a length fits at every shorter one: doubling from `start` while it fits, then bisection
    between the longest that fit and the shortest that did not. Returns (length, capped): 0 if not even
    `quantum` fits; capped when the doubling reached `limit` without a failure."""
    good, bad = 0, None
    length = start
    while length <= limit:
        if not fits(length):
            bad = length
            break
        good = length
        length *= 2
    if bad is None:
        return good, True
    while bad - good > quantum:
        middle = (good + bad) // 2 // quantum * quantum
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, False


def corpus(path: Path, tokens: int) -> Path:
    """Python's documentation (every CPython has it), repeated into a JSONL of at least `tokens` tokens
    (about 4 characters a token): enough for the longest block the search may try."""
    from dstrain.data.python_docs import documentation_texts

    texts = list(documentation_texts())
    size = sum(map(len, texts))
    with path.open("w", encoding="utf-8") as out:
        for _ in range(math.ceil(tokens * 4 / size) + 1):
            for text in texts:
                out.write(json.dumps({"text": text}) + "\n")
    return path


class Trials:
    """One short pretrain.py run per (configuration, length); the logged metrics of those that trained."""

    def __init__(self, args, work: Path, tokenizer: Path, files: list[str]):
        self.args, self.work, self.tokenizer, self.files = args, work, tokenizer, files
        self.deepspeed = str(Path(sys.executable).parent / "deepspeed")

    def run(self, gpus: int, sp: int, tiled: bool, length: int) -> dict | None:
        from dstrain.distributed import free_port

        out = self.work / f"g{gpus}_sp{sp}_t{int(tiled)}_{length}"
        command = [self.deepspeed, "--num_gpus", str(gpus), "--master_port", str(free_port()), "pretrain.py",
                   "--deepspeed", "ds_configs/zero3.json", "--tokenizer_name", str(self.tokenizer),
                   "--config_name", self.args.config_name, "--pad_vocab_size_to_multiple_of", "32000",
                   "--max_position_embeddings", str(max(length, 4096)), "--block_size", str(length),
                   "--train_files", *self.files, "--data_cache_dir", str(self.work / "cache"),
                   "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                   "--max_steps", str(self.args.steps), "--logging_steps", "1", "--save_strategy", "no",
                   "--validation_split_percentage", "0", "--learning_rate", "1e-4", "--bf16",
                   "--activation_checkpointing", "--attn_implementation", self.args.attn_implementation,
                   "--sequence_parallel_size", str(sp), "--report_to", "none", "--output_dir", str(out)]
        if tiled:
            command += ["--tiled_mlp", "--tiled_loss"]
        env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        try:
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=self.args.trial_timeout)
        except subprocess.TimeoutExpired:
            print(f"  {length:>9,}  timed out after {self.args.trial_timeout} s: counted as not fitting", flush=True)
            return None
        output = result.stdout + result.stderr
        if result.returncode != 0:
            if any(marker in output for marker in OUT_OF_MEMORY):
                print(f"  {length:>9,}  out of memory", flush=True)
                return None
            lines = [line for line in output.splitlines() if line.strip()]
            sys.exit(f"error: trial at {length} tokens ({gpus} GPUs, SP {sp}, tiled {tiled}) failed for another reason "
                     f"than memory (exit {result.returncode}): {lines[-1] if lines else 'no output'}")
        state = json.loads((out / "trainer_state.json").read_text())
        last = [entry for entry in state["log_history"] if "tokens_per_second" in entry][-1]
        print(f"  {length:>9,}  trained: {last['tokens_per_second']:,.0f} tokens/s, "
              f"peak {last.get('peak_memory_gb', float('nan')):.1f} GiB", flush=True)
        return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--config_name", default="llama-1b", help="the model preset (configs/models/)")
    parser.add_argument("--train_files", nargs="*", help="default: Python's documentation, repeated")
    parser.add_argument("--start", type=int, default=4096, help="first length tried (doubled while it trains)")
    parser.add_argument("--limit", type=int, default=1 << 20, help="longest length tried")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per trial (tokens/s: the last)")
    parser.add_argument("--attn_implementation", default="flash_attention_2")
    parser.add_argument("--trial_timeout", type=int, default=1800, help="seconds; a longer trial counts as failed")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        sys.exit("error: bench/long_context.py needs CUDA GPUs and found none: it measures GPU memory and speed "
                 "(run it on the GPU machine)")
    if args.attn_implementation == "flash_attention_2":
        from importlib.util import find_spec

        if find_spec("flash_attn") is None:
            sys.exit("error: --attn_implementation flash_attention_2 needs the flash-attn package (pip install "
                     "flash-attn), or pass --attn_implementation sdpa")

    from dstrain.data.records import expand_inputs, iter_texts
    from dstrain.data.tokenizer import train_bpe_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = expand_inputs(args.train_files) if args.train_files else [corpus(work / "docs.jsonl", args.limit)]
        train_bpe_tokenizer(iter_texts(files), vocab_size=8000).save_pretrained(work / "tok")
        trials = Trials(args, work, work / "tok", [str(path) for path in files])
        for name in args.configs:
            where, split, tiled = CONFIGS[name]
            ranks = 1 if where == "one" else gpus
            sp = gpus if split else 1
            if name.startswith("N") and gpus == 1:
                print(f"{name}: skipped (one GPU)")
                continue
            print(f"{name}: {ranks} GPU(s), sequence parallel {sp}, tiled MLP {'on' if tiled else 'off'}", flush=True)
            results = {}

            def fits(length, ranks=ranks, sp=sp, tiled=tiled, results=results):
                results[length] = trials.run(ranks, sp, tiled, length)
                return results[length] is not None

            quantum = math.lcm(1024, sp)
            longest, capped = longest_that_fits(fits, max(args.start // quantum, 1) * quantum, args.limit, quantum)
            metrics = results.get(longest) or {}
            rows.append((name.replace("N", str(gpus), 1), ranks, sp, tiled, longest, capped, metrics))

    print(f"\n{args.config_name}, ZeRO-3, bf16, activation checkpointing, {args.attn_implementation}, 1 sequence per GPU")
    print(f"{'config':<14} {'GPUs':>4} {'SP':>3} {'tiled':>5} {'max length':>12} {'tokens/s':>10} {'peak GiB':>9}")
    for name, ranks, sp, tiled, longest, capped, metrics in rows:
        length = f"{'>=' if capped else ''}{longest:,}"
        speed = f"{metrics['tokens_per_second']:,.0f}" if metrics else "-"
        peak = f"{metrics['peak_memory_gb']:.1f}" if "peak_memory_gb" in metrics else "-"
        print(f"{name:<14} {ranks:>4} {sp:>3} {'yes' if tiled else 'no':>5} {length:>12} {speed:>10} {peak:>9}")


if __name__ == "__main__":
    main()
