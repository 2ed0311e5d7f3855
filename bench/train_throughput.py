"""Training throughput: pretrain.py against a plain HF Trainer script on identical work.

    python bench/train_throughput.py                       # ../shared/data/pretrain_en.jsonl if present
    python bench/train_throughput.py --train_files corpus.jsonl --config_name llama-120m --block_size 1024 \
        --batch_size 8 --steps 50 --deepspeed ds_configs/zero2.json       # on a GPU machine

Both runs train the same model (the preset's config derived from the same tokenizer, the same
seed), on the same blocks (the data bench asserts the two pipelines give identical blocks), with
the same batch, learning rate and number of steps, logging every step:
  plain      the tutorial script: load_dataset + map + group_texts, AutoModelForCausalLM.from_config,
             Trainer(default_data_collator), train()  (bench/data_pipeline.py's recipe)
  pretrain   python pretrain.py with the same values as flags, the monitoring callback on
             (tokens/s, memory, MFU with --peak_tflops, as any run)
Each is a fresh process; tokens/s is train() alone (the Trainer's train_runtime, which leaves
out start-up and data preparation), printed as a ratio against the plain script; runs alternate
over the rounds and the fastest of each counts. Equal final losses show the work was the same.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plain_trainer_script(args) -> None:
    """What a user would write from the tutorials (here in a process of its own)."""
    import torch
    from data_pipeline import tutorial_blocks
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    kernel = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_config), **kernel)
    train = tutorial_blocks([Path(f) for f in args.train_files], tokenizer, args.block_size, Path(args.output_dir) / "cache")
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.learning_rate, logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
        deepspeed=args.deepspeed, bf16=args.bf16, dataloader_pin_memory=False, disable_tqdm=True,
        torch_compile=args.torch_compile, use_liger_kernel=args.use_liger_kernel,
    )
    result = Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator).train()
    if torch.cuda.is_available():  # bench/gpu.sh's table reads it
        result.metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result.metrics))


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_files", nargs="*")
    parser.add_argument("--config_name", default="demo", help="model preset (configs/models/)")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--deepspeed", help="a DeepSpeed config for both (GPU machines: use deepspeed --num_gpus 1)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    # the plain script's own mode, run in a subprocess by the benchmark
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--model_config", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    parser.add_argument("--attn_implementation", help=argparse.SUPPRESS)  # bench/gpu.sh's variants
    parser.add_argument("--torch_compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--use_liger_kernel", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_trainer_script(args)
        return

    from transformers import AutoTokenizer

    from dstrain.data.records import expand_inputs, iter_texts
    from dstrain.data.tokenizer import train_bpe_tokenizer
    from dstrain.model.config import derive_model_config

    shared = REPO.parent / "shared" / "data" / "pretrain_en.jsonl"
    files = expand_inputs(args.train_files or ([str(shared)] if shared.exists() else []))
    if not files:
        sys.exit("give --train_files (no ../shared/data/pretrain_en.jsonl here)")
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_bpe_tokenizer(iter_texts(files), vocab_size=4096).save_pretrained(work / "tok")
        config = derive_model_config(AutoTokenizer.from_pretrained(work / "tok"), args.config_name)
        config.save_pretrained(work / "model")
        shared_flags = ["--block_size", str(args.block_size), "--seed", str(args.seed)]
        extra = (["--deepspeed", args.deepspeed] if args.deepspeed else []) + (["--bf16"] if args.bf16 else [])
        commands = {
            "plain": [sys.executable, "bench/train_throughput.py", "--plain", "--tokenizer", str(work / "tok"),
                      "--model_config", str(work / "model"), "--train_files", *map(str, files),
                      "--batch_size", str(args.batch_size), "--steps", str(args.steps),
                      "--learning_rate", str(args.learning_rate), *shared_flags, *extra],
            "pretrain": [sys.executable, "pretrain.py", "--tokenizer_name", str(work / "tok"),
                         "--config_name", str(work / "model" / "config.json"), "--train_files", *map(str, files),
                         "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
                         "--learning_rate", str(args.learning_rate), "--logging_steps", "1", "--save_strategy", "no",
                         "--validation_split_percentage", "0", "--report_to", "none", "--disable_tqdm", "true",
                         "--data_cache_dir", str(work / "cache"), *shared_flags, *extra],
        }
        print(f"{args.config_name} model, blocks of {args.block_size}, batch {args.batch_size}, {args.steps} steps, "
              f"{', '.join(map(str, files))}")
        results = {name: [] for name in commands}
        for round_ in range(args.rounds):
            for name, command in commands.items():
                out = work / f"{name}-{round_}"
                result = run(command + ["--output_dir", str(out)], env)
                if name == "plain":
                    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
                    results[name].append(json.loads(line[len("RESULT "):]))
                else:
                    results[name].append(json.loads((out / "train_results.json").read_text()))
        tokens = args.steps * args.batch_size * args.block_size
        best = {name: min(runs, key=lambda m: m["train_runtime"]) for name, runs in results.items()}
        print(f"{'script':<9} {'train s':>8} {'tokens/s':>10} {'ratio':>7} {'final train loss':>17}")
        for name, metrics in best.items():
            speed = tokens / metrics["train_runtime"]
            baseline = tokens / best["plain"]["train_runtime"]
            print(f"{name:<9} {metrics['train_runtime']:>8.2f} {speed:>10,.0f} {speed / baseline:>6.2f}x "
                  f"{metrics['train_loss']:>17.4f}")


if __name__ == "__main__":
    main()
