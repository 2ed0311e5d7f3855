"""For the tests: count the torch.distributed collectives a training run issues per optimizer step
(DSTRAIN_COUNT_COLLECTIVES, armed by dstrain/train/faults.py's install_faults), so a test can hold
the toolkit to "no collective per micro-batch, at most one small one per step and per log"."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "scatter")


class CollectiveCount(TrainerCallback):
    """Counts every torch.distributed collective this rank issues during training, per optimizer step
    (from one on_step_begin to the next: a step's own end-of-step callbacks, logging and saving count
    in it), by who issued it: the innermost caller outside torch and deepspeed.comm, named by its
    package (deepspeed, transformers, accelerate, ...) or, for this project's code, "dstrain:" and
    its function. Collectives issued inside a micro-batch's training_step (forward and backward) are
    counted apart. Written as JSON at the end of training: {step: {"micro_batches": n,
    "in_micro_batch": {source: n}, "between": {source: n}}}."""

    def __init__(self, trainer, path: Path):
        self.path, self.step, self.in_micro_batch, self.steps = path, 0, False, {}
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, original in self.originals.items():
            setattr(dist, name, self._counting(original))
        training_step = trainer.training_step

        def counted_step(*args, **kwargs):
            self._record("micro_batches")
            self.in_micro_batch = True
            try:
                return training_step(*args, **kwargs)
            finally:
                self.in_micro_batch = False

        trainer.training_step = counted_step

    def _counting(self, original):
        def collective(*args, **kwargs):
            if self.step:  # training has started
                self._record("in_micro_batch" if self.in_micro_batch else "between", _caller())
            return original(*args, **kwargs)

        return collective

    def _record(self, kind: str, source: str | None = None) -> None:
        entry = self.steps.setdefault(self.step, {"micro_batches": 0, "in_micro_batch": {}, "between": {}})
        if source is None:
            entry[kind] += 1
        else:
            entry[kind][source] = entry[kind].get(source, 0) + 1

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        for name, original in self.originals.items():
            setattr(dist, name, original)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.steps, indent=1))


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if "/torch/" not in name and "/deepspeed/comm/" not in name:
            break
        frame = frame.f_back
    if frame is None:
        return "unknown"
    if "site-packages/" in name:
        return name.split("site-packages/", 1)[1].split("/", 1)[0]
    return f"dstrain:{Path(name).stem}.{frame.f_code.co_name}"
