"""Peak memory per rank: ZeRO-2 against ZeRO-3 and ZeRO-3 with CPU offload, on a ~100M model.

    python bench/zero_memory.py                            # 2 ranks (CPU ranks without a GPU)
    python bench/zero_memory.py --ranks 8 --config_name llama-120m --block_size 1024 --steps 5

Each config trains the same model (llama2-768: 768 wide, 12 layers; the vocabulary padded to
32,000 whatever the tokenizer, so about 102M parameters) for a few steps with pretrain.py under
`deepspeed --num_gpus N`, and reads what the monitoring callback logged at the last step:
peak_memory_gb (the largest rank's peak: torch.cuda.max_memory_allocated on GPUs, the process's
max resident set on CPU ranks) and step_time. Printed as ratios against ZeRO-2 in this run.
On CPU ranks "offload" moves state from CPU memory to CPU memory, so it saves nothing there; the
resident set also holds the libraries, the data and the communication buffers, not tensors alone.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dstrain.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

CONFIGS = ["zero2", "zero3", "zero3_offload"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_files", nargs="*")
    parser.add_argument("--config_name", default="llama2-768")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args()

    from dstrain.data.records import expand_inputs, iter_texts
    from dstrain.data.tokenizer import train_bpe_tokenizer

    shared = REPO.parent / "shared" / "data" / "pretrain_en.jsonl"
    files = expand_inputs(args.train_files or ([str(shared)] if shared.exists() else []))
    if not files:
        sys.exit("give --train_files (no ../shared/data/pretrain_en.jsonl here)")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_bpe_tokenizer(iter_texts(files), vocab_size=8000).save_pretrained(work / "tok")
        for name in args.configs:
            out = work / name
            command = [deepspeed, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), "pretrain.py",
                       "--deepspeed", f"ds_configs/{name}.json", "--tokenizer_name", str(work / "tok"),
                       "--config_name", args.config_name, "--pad_vocab_size_to_multiple_of", "32000",
                       "--train_files", *map(str, files), "--block_size", str(args.block_size),
                       "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
                       "--logging_steps", "1", "--save_strategy", "no", "--validation_split_percentage", "0",
                       "--report_to", "none", "--disable_tqdm", "true", "--audit", "off",
                       "--data_cache_dir", str(work / "cache"), "--output_dir", str(out)]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                sys.exit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
            size = next((line for line in result.stdout.splitlines() if "Initialised a new" in line), "")
            logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
            results[name] = logs[-1]
            print(f"{name}: {size.strip()}", flush=True)
    memory_kind = "GPU allocated" if _has_gpu() else "CPU resident set"
    print(f"{args.ranks} ranks, batch {args.batch_size} x {args.block_size} tokens per rank, {args.steps} steps; "
          f"peak memory = the largest rank's {memory_kind}")
    base = results[args.configs[0]]
    print(f"{'config':<14} {'peak GB/rank':>12} {'ratio':>7} {'step s':>8} {'ratio':>7}")
    for name, last in results.items():
        print(f"{name:<14} {last['peak_memory_gb']:>12.2f} {last['peak_memory_gb'] / base['peak_memory_gb']:>6.2f}x "
              f"{last['step_time']:>8.2f} {last['step_time'] / base['step_time']:>6.2f}x")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
