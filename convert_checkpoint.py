"""Convert a DeepSpeed ZeRO checkpoint to a universal checkpoint, loadable by any number of ranks.

Resuming on another world size does this by itself (dstrain/train/elastic.py), on rank 0 while the
other ranks wait. For a large model, convert by hand first, on a machine with the CPU memory
for it and with more worker processes; the resumed run then reuses the result:

    python convert_checkpoint.py out/pt/checkpoint-2000 --workers 8
    deepspeed --num_gpus 6 pretrain.py <the same arguments> --resume_from_checkpoint last

The result is written beside the original shards, which stay as they were:
checkpoint-2000/global_step2000_universal/ and checkpoint-2000/latest_universal. The conversion is
DeepSpeed's own (deepspeed.checkpoint.ds_to_universal).
"""

import argparse
from pathlib import Path

from dstrain.cli import cli_entry
from dstrain.errors import UserError
from dstrain.train.elastic import convert_to_universal, saved_topology


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint-N folder written by a DeepSpeed run")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes for DeepSpeed's extraction and merge (each holds shards in memory)")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"no checkpoint folder at {checkpoint}")
    saved = saved_topology(checkpoint)
    if saved is None:
        inside = sorted(checkpoint.glob("checkpoint-*"), key=lambda path: path.name)
        if inside:
            raise UserError(f"{checkpoint} is a run folder: pass one of its checkpoints, e.g. {inside[-1]}")
        raise UserError(f"{checkpoint}: not a DeepSpeed checkpoint (no global_step* folder); "
                        "a checkpoint without one loads on any number of ranks as it is")
    print(f"{checkpoint.name}: ZeRO-{saved.zero_stage}, written by {saved.world_size} ranks, "
          f"global batch {saved.global_batch} ({saved.per_device_batch} per device x "
          f"{saved.gradient_accumulation} accumulation x {saved.world_size} ranks)")
    target = convert_to_universal(checkpoint, saved.tag, workers=args.workers)
    print(f"Universal checkpoint: {target}")


if __name__ == "__main__":
    cli_entry(main)()
