"""Numerical faults (non-finite loss or gradient norm, fp16 loss-scale collapse) and, for the
tests only, deterministic fault injection and a trace of the batches each rank is given.

Why not HF's own handling: `logging_nan_inf_filter` (on by default) replaces a NaN/inf loss in
the *logged* average and trains on, so a run can diverge silently (and reads every micro-batch's
loss on the host to do so). The guard here checks every micro-batch's loss on the device, reads
the verdict once per optimizer step with one small all_gather (so every rank stops at the same
point and none is left waiting in a collective), and either stops the run with one line naming
the step or, with --nonfinite_loss skip, trains that micro-batch with zero gradient.
With --spike_rollback both checks hand the step to the rollback (dstrain/train/spikes.py) instead.
"""

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from transformers import TrainerCallback

from dstrain.distributed import print0, rank
from dstrain.errors import UserError

FAULT_ENV = "DSTRAIN_FAULT"
FAULT_PHASES = ("train", "save", "shard", "nan", "grad", "spike", "pause")
TRACE_ENV = "DSTRAIN_TRACE_BATCHES"
COLLECTIVES_ENV = "DSTRAIN_COUNT_COLLECTIVES"
SPIKE_FACTOR = 50.0  # phase spike: the micro-batch's loss (and so its gradients) times this
PAUSE_LIMIT = 300  # seconds phase pause waits for a preemption signal before it gives up and goes on


def _gather(values: torch.Tensor) -> torch.Tensor:
    """Each rank's small vector, one row per rank (one all_gather; a single process: its own row)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values.unsqueeze(0)
    rows = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values)
    return torch.stack(rows)


class NonFiniteGuard(TrainerCallback):
    """A NaN/inf training loss on any rank stops every rank with `error: step N: ...` at the end of
    that optimizer step, or (policy "skip") that micro-batch adds no gradient on its rank: a hook on
    every trainable parameter zeroes its gradient, so DeepSpeed's reductions see zeros, not NaN.

    Nothing here waits for the device per micro-batch: each loss is checked by `torch.isfinite` on
    the device and the verdict kept there (a count and the first bad value); the host reads it once
    per optimizer step, all ranks' at once with one small all_gather in `on_step_end`, which must run
    before NumericalHealthCallback's (a NaN loss also makes the gradient norm NaN, and the loss is the
    cause to name). The NaN micro-batch's backward still runs; under "stop" the run ends before that
    step is logged or saved, so nothing written holds its update. Under "skip" the returned loss is 0
    for that micro-batch (the logged average stays finite, as before).

    With a spike rollback (`spikes`) the micro-batch is zeroed the same way (so the optimizer and the
    schedule take their step as usual) and the step's verdict, still on the device, goes to the
    rollback (dstrain/train/spikes.py), whose own once-per-step all-reduce reads it and rolls back."""

    def __init__(self, trainer, policy: str, spikes=None):
        self.trainer, self.policy, self.skipped, self.spikes = trainer, policy, 0, spikes
        self.bad = self.first = self.now = None  # this step's count of non-finite micro-batch losses, and the first such loss;
        # now: the current micro-batch's verdict, read by the gradient hooks of policy skip
        self.hooks = []
        self.zeroes = policy == "skip" or spikes is not None
        self.compute_loss = trainer.compute_loss
        trainer.compute_loss = self
        if self.zeroes:
            self.hooks = [p.register_hook(self._zero_if_bad) for p in trainer.model.parameters() if p.requires_grad]
        # HF's own NaN filter for the logged loss reads every micro-batch's loss on the host (a sync each);
        # the guard already keeps non-finite losses out of every completed step's log.
        trainer.args.logging_nan_inf_filter = False

    def _zero_if_bad(self, gradient):
        return gradient if self.now is None else gradient.masked_fill(self.now, 0)

    def __call__(self, model, inputs, *args, **kwargs):
        self.now = None
        result = self.compute_loss(model, inputs, *args, **kwargs)
        if not model.training:  # evaluation: nothing is trained on it
            return result
        loss = result[0] if isinstance(result, tuple) else result
        value = loss.detach().float().mean()
        bad = ~torch.isfinite(value)
        if self.bad is None:
            self.bad, self.first = bad.long(), torch.where(bad, value, 0.0)
        else:
            self.first = torch.where((self.bad == 0) & bad, value, self.first)
            self.bad = self.bad + bad
        if not self.zeroes:
            return result
        self.now = bad
        loss = torch.where(bad, torch.zeros_like(loss), loss)  # its backward sends 0 (then NaN) down: the hooks zero it
        return (loss, *result[1:]) if isinstance(result, tuple) else loss

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad is None:
            return
        if self.spikes is not None:  # read there, in the rollback's one all-reduce of the step
            self.spikes.nonfinite, self.bad, self.first, self.now = self.bad > 0, None, None, None
            return
        local = torch.stack([self.bad.double(), self.first.double()])
        self.bad = self.first = self.now = None
        bad = {r: (int(count), value) for r, (count, value) in enumerate(_gather(local).tolist()) if count}
        if not bad:
            return
        step = state.global_step
        where = ", ".join(f"{value} on rank {r}" for r, (_, value) in bad.items())
        if self.policy != "skip":
            raise UserError(f"step {step}: the training loss is {where}; stopping (resume with "
                            "--resume_from_checkpoint last, e.g. with a lower learning rate, or pass "
                            "--nonfinite_loss skip to skip such batches)")
        count = sum(c for c, _ in bad.values())
        self.skipped += count
        print0(f"step {step}: the training loss is {where}; {'that micro-batch' if count == 1 else f'{count} micro-batches'}"
               f" trained with zero gradient ({self.skipped} skipped so far)")

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class NumericalHealthCallback(TrainerCallback):
    """After each optimizer step: a non-finite global gradient norm stops the run (the update is
    already applied by then, so it cannot be skipped), and an fp16 loss scale at its floor is
    reported. Both values come from the DeepSpeed engine and are the same on every rank, so
    every rank decides alike without a collective. With a spike rollback (`spikes`), a non-finite norm
    is rolled back instead (this callback must then come before the rollback's)."""

    def __init__(self, trainer, spikes=None):
        self.trainer, self.warned_scale, self.spikes = trainer, False, spikes

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        get_norm = getattr(engine, "get_global_grad_norm", None)
        norm = get_norm() if get_norm else None
        if norm is not None and not math.isfinite(float(norm)):
            if self.spikes is None:
                raise UserError(f"step {state.global_step}: the gradient norm is {float(norm)}; stopping (resume "
                                "with --resume_from_checkpoint last, e.g. with a lower learning rate or "
                                "--max_grad_norm)")
            if not self.spikes.skips(state.global_step):  # a skipped step ran no engine step: the norm is stale
                self.spikes.nonfinite = True
        message = loss_scale_collapse(getattr(engine, "optimizer", None), getattr(engine, "skipped_steps", 0),
                                      state.global_step)
        if message and not self.warned_scale:
            self.warned_scale = True
            print0(f"warning: {message}")


def loss_scale_collapse(optimizer, skipped_steps: int, step: int) -> str | None:
    """A line when fp16 dynamic loss scaling has collapsed: DeepSpeed's DynamicLossScaler (the
    optimizer's `loss_scaler`) sits at its `min_scale`, so steps keep being skipped for overflow
    (DeepSpeed then raises once more overflow comes, see LOSS_SCALE_AT_MINIMUM). bf16/fp32 runs
    have a static scaler (`dynamic` False) and always get None."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if not getattr(scaler, "dynamic", False) or scaler.cur_scale > scaler.min_scale:
        return None
    return (f"step {step}: the fp16 loss scale has fallen to its minimum ({scaler.cur_scale:g}) after "
            f"{skipped_steps} steps skipped for overflow; the run is not learning (lower the learning rate, "
            "or train in bf16)")


# DeepSpeed's DynamicLossScaler raises a bare Exception with this text when an overflow comes at the minimum scale.
LOSS_SCALE_AT_MINIMUM = "loss scale already at minimum"


# ---- fault injection (tests) -----------------------------------------------------------------

@dataclass
class Fault:
    """DSTRAIN_FAULT="rank:1,step:5,phase:train": at that step, that rank
    train: is SIGKILLed once the step is done (before its checkpoint);
    save:  is SIGKILLed inside the save of checkpoint-<step>, after DeepSpeed wrote global_step<step>/
           and `latest`, before the RNG states and trainer_state.json;
    shard: is SIGKILLed right after writing its own ZeRO optimizer shard (other ranks' shards and
           `latest` may or may not be there);
    nan:   computes a NaN loss for its first micro-batch of that step;
    grad:  keeps that micro-batch's loss finite but makes its gradients NaN;
    spike: multiplies that micro-batch's loss by SPIKE_FACTOR (a finite loss spike);
    pause: waits inside that micro-batch until this rank hears a preemption signal (at most PAUSE_LIMIT s),
           so a test can signal a run at a chosen step, mid-step, without racing it.
    Several faults are separated by ';'."""

    rank: int
    step: int
    phase: str


def faults_from_env() -> list[Fault]:
    faults = []
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        try:
            fields = dict(item.split(":", 1) for item in spec.split(","))
            fault = Fault(rank=int(fields["rank"]), step=int(fields["step"]), phase=fields["phase"])
        except (KeyError, ValueError):
            raise UserError(f"{FAULT_ENV}={spec!r}: expected rank:R,step:S,phase:{'|'.join(FAULT_PHASES)}") from None
        if fault.phase not in FAULT_PHASES:
            raise UserError(f"{FAULT_ENV}: phase must be one of {', '.join(FAULT_PHASES)}, got {fault.phase}")
        faults.append(fault)
    return faults


def _die() -> None:
    print(f"{FAULT_ENV}: rank {rank()} kills itself (SIGKILL)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfterStep(TrainerCallback):
    def __init__(self, fault):
        self.fault = fault

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.fault.step:
            _die()


def install_faults(trainer, stop=None) -> None:
    """Arm the faults DSTRAIN_FAULT names for this rank, the batch trace DSTRAIN_TRACE_BATCHES asks for
    and the collective count of DSTRAIN_COUNT_COLLECTIVES (nothing happens without the variables).
    `stop`: the run's StopSignals, which phase pause waits on."""
    for fault in faults_from_env():
        if fault.rank == rank():
            _install(trainer, fault, stop)
    if os.environ.get(TRACE_ENV):
        _trace_batches(trainer, Path(os.environ[TRACE_ENV]) / f"batches-rank{rank()}.jsonl")
    if os.environ.get(COLLECTIVES_ENV):
        from dstrain.train.collective_count import CollectiveCount

        trainer.add_callback(CollectiveCount(trainer, Path(os.environ[COLLECTIVES_ENV]) / f"collectives-rank{rank()}.json"))


def _install(trainer, fault: Fault, stop) -> None:
    at_step = lambda: trainer.state.global_step == fault.step  # noqa: E731
    if fault.phase == "train":
        trainer.add_callback(_KillAfterStep(fault))
    elif fault.phase == "save":
        save_rng_state = trainer._save_rng_state
        trainer._save_rng_state = lambda output_dir: _die() if at_step() else save_rng_state(output_dir)
    elif fault.phase == "shard":
        # The engine is built inside trainer.train(), so its class method is wrapped (this process only).
        save_zero_checkpoint = DeepSpeedEngine._save_zero_checkpoint

        def save_shard_then_die(engine, save_path, tag):
            save_zero_checkpoint(engine, save_path, tag)
            if at_step():
                _die()

        DeepSpeedEngine._save_zero_checkpoint = save_shard_then_die
    else:
        compute_loss, fired = trainer.compute_loss, []

        def faulty_loss(model, inputs, *args, **kwargs):
            result = compute_loss(model, inputs, *args, **kwargs)
            if model.training and trainer.state.global_step + 1 == fault.step and not fired:
                fired.append(True)
                if fault.phase == "pause":
                    _pause(fault, stop)
                    return result
                loss = result[0] if isinstance(result, tuple) else result
                loss = {"nan": lambda: loss * float("nan"), "spike": lambda: loss * SPIKE_FACTOR,
                        "grad": lambda: _NanGradient.apply(loss)}[fault.phase]()
                return (loss, *result[1:]) if isinstance(result, tuple) else loss
            return result

        trainer.compute_loss = faulty_loss


def _pause(fault: Fault, stop) -> None:
    print(f"{FAULT_ENV}: rank {rank()} pauses in step {fault.step} until a preemption signal", flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT
    while (stop is None or stop.received is None) and time.monotonic() < deadline:
        time.sleep(0.05)


def _trace_batches(trainer, path: Path) -> None:
    """One JSON line per micro-batch this rank is given ({"step", "input_ids"}) and per one it trains on
    ({"step", "trained": true}): the data order as the Trainer delivers it, and what was computed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    get_batch_samples, compute_loss = trainer.get_batch_samples, trainer.compute_loss

    def write(record: dict) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def traced_batches(epoch_iterator, num_batches, device):
        batches, items = get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batches:
            write({"step": trainer.state.global_step + 1, "input_ids": batch["input_ids"].tolist()})
        return batches, items

    def traced_loss(model, inputs, *args, **kwargs):
        if model.training:
            write({"step": trainer.state.global_step + 1, "trained": True})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.get_batch_samples, trainer.compute_loss = traced_batches, traced_loss


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN backward (a finite loss whose gradients blow up)."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, gradient):
        return gradient * float("nan")
