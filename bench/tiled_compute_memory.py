"""Activation memory of one training step at a long sequence, with and without ALST's tiled compute
(--tiled_mlp, then --tiled_mlp --tiled_loss: dstrain/train/tiled_compute.py), with and without activation
checkpointing: side by side, as ratios against the untiled step.

    python bench/tiled_compute_memory.py                       # the demo preset, 16,384 tokens, on CPU
    python bench/tiled_compute_memory.py --config_name llama-120m --length 32768 --vocab_size 32000

Each variant runs in a fresh process: the model (random weights, fp32), then one forward and backward of
one sequence of --length tokens with its loss. The figure is the step's peak memory above what the process
held before it: on CPU the peak resident set (getrusage) minus the resident set before the step, with
glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the system instead of
staying in the heap; on a GPU torch.cuda.max_memory_allocated minus the allocated memory before the step.
The same step's loss and the largest gradient difference against the untiled run show the tiling computes
the same thing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step(args) -> dict:
    """The child: one variant's step, measured."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dstrain.model.config import load_model_spec
    from dstrain.train.tiled_compute import loss_shards_for, shards_for, tile_loss, tile_mlps

    torch.manual_seed(0)
    spec = load_model_spec(args.config_name) | {"vocab_size": args.vocab_size, "max_position_embeddings": args.length}
    config = AutoConfig.for_model(**spec)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    if args.checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    shards = loss_shards = 0
    if args.tiled:
        shards = shards_for(args.length, 1, config.hidden_size)
        tile_mlps(model, shards)
    if args.tiled_loss:
        loss_shards = loss_shards_for(args.length, 1, config.vocab_size)
        tile_loss(model, loss_shards)
    ids = torch.randint(0, args.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1)).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time.perf_counter() - start
    torch.save({name: p.grad.cpu() for name, p in model.named_parameters()}, args.grads)
    return {"peak_bytes": peak, "seconds": seconds, "loss": loss.item(), "shards": shards, "loss_shards": loss_shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_name", default="demo")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiled_loss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args)))
        return

    import tempfile

    import torch

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for checkpointing in (False, True):
            for tiled in ("no", "mlp", "mlp+loss"):
                grads = Path(tmp) / f"{checkpointing}-{tiled}.pt"
                command = [sys.executable, __file__, "--child", "--config_name", args.config_name, "--length",
                           str(args.length), "--vocab_size", str(args.vocab_size), "--grads", str(grads)]
                command += ["--tiled"] * (tiled != "no") + ["--tiled_loss"] * (tiled == "mlp+loss")
                command += ["--checkpointing"] * checkpointing
                result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(result.stderr.strip().splitlines()[-1])
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                reference = torch.load(Path(tmp) / f"{checkpointing}-no.pt")
                now = torch.load(grads)
                measured["grad_diff"] = max((now[name] - reference[name]).abs().max().item() for name in reference)
                results[checkpointing, tiled] = measured
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak resident set)"
    print(f"{args.config_name}, {args.length:,} tokens, vocabulary {args.vocab_size:,}, fp32, one step, {device}")
    print(f"{'checkpointing':<14} {'tiled (shards)':<22} {'peak MiB':>9} {'ratio':>6} {'seconds':>8} {'loss':>9} "
          f"{'max |grad diff|':>16}")
    for (checkpointing, tiled), measured in results.items():
        ratio = measured["peak_bytes"] / results[checkpointing, "no"]["peak_bytes"]
        label = {"no": "no", "mlp": f"MLP ({measured['shards']})",
                 "mlp+loss": f"MLP ({measured['shards']}) + loss ({measured['loss_shards']})"}[tiled]
        print(f"{'yes' if checkpointing else 'no':<14} {label:<22} {measured['peak_bytes'] / 2**20:>9,.0f} "
              f"{ratio:>6.2f} {measured['seconds']:>8.1f} {measured['loss']:>9.5f} {measured['grad_diff']:>16.2e}")


if __name__ == "__main__":
    main()
