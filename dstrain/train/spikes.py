"""Loss-spike rollback (--spike_rollback true): a step whose loss jumps far above the recent ones is
undone by reloading the last checkpoint's weights and optimizer, and training goes on past the data
that led to it.

Large runs spike: a bad batch or an unlucky update sends the loss up and, left alone, the run may never
come back. The cure practised on large models (PaLM, section 5.1: "restart from a checkpoint roughly
100 steps before the spike started, and skip roughly 200-500 data batches") is done by hand there; here
it is automatic:

- A spike: at the end of optimizer step P, the step's loss (the mean over ranks of what HF logs for it)
  is more than --spike_threshold standard deviations above the mean of the last --spike_window steps'
  losses (the deviation is floored at 1% of the mean, so a flat loss curve does not make every wobble a
  spike); a non-finite loss on any rank or a non-finite gradient norm is always one. Every rank sums its
  loss and all agree with one all-reduce per step, so all decide alike.
- The rollback: the newest complete checkpoint in output_dir before P (C, chosen by rank 0 for all) gives back
  its weights and optimizer state. The clock does not go back: the global step, the learning-rate
  schedule and the data position stay at P, so the batches of steps C+1..P are skipped (trained on, then
  undone) and the run goes on with batch P+1, or P+1+N with --spike_skip_batches N (those steps run no
  forward pass; their learning-rate steps pass). Because step and data position keep HF's relation, a
  run resumed from any later checkpoint continues exactly.
- --spike_lr_factor f for --spike_lr_steps L: the L steps after the skipped batches train at f times the
  scheduled learning rate (scaled at each step's start; the schedule itself is untouched).
- Each rollback is printed and logged (trainer_state.json, WandB: spike_* keys); after
  --spike_max_rollbacks rollbacks the next spike stops the run with one line.
The rollback state (count, skipped batches, lowered steps, the loss window) is saved in every checkpoint
(spike_rollback.json), so a resumed run keeps it.
"""

import json
import math
import statistics
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedSchedulerWrapper
from transformers import Trainer, TrainerCallback

from dstrain.distributed import is_main_process, print0
from dstrain.errors import UserError
from dstrain.train.checkpoints import CHECKPOINT_NAME, checkpoint_folders, incomplete_reason
from dstrain.train.elastic import deepspeed_tag

STATE_FILE = "spike_rollback.json"
RELATIVE_FLOOR = 0.01  # the standard deviation counts as at least 1% of the mean loss


class SpikeDetector:
    """The last `window` steps' losses and the rule that calls a loss a spike (pure: no torch, no ranks)."""

    def __init__(self, window: int, threshold: float, history=()):
        self.window, self.threshold = window, threshold
        self.history = deque(history, maxlen=window)  # (step, loss)

    def verdict(self, loss: float) -> str | None:
        """Why `loss` is a spike, or None."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if len(self.history) < self.window:
            return None
        losses = [value for _, value in self.history]
        mean = statistics.fmean(losses)
        deviation = max(statistics.pstdev(losses), RELATIVE_FLOOR * abs(mean))
        if loss <= mean + self.threshold * deviation:
            return None
        return (f"loss {loss:.4f} is {(loss - mean) / deviation:.1f} standard deviations above the mean "
                f"{mean:.4f} of the last {len(losses)} steps")

    def add(self, step: int, loss: float) -> None:
        self.history.append((step, loss))

    def forget_after(self, step: int) -> None:
        """Drop the losses of steps whose updates were undone."""
        self.history = deque(((s, v) for s, v in self.history if s <= step), maxlen=self.window)


class SpikeRollback(TrainerCallback):
    """See the module docstring. Wraps `trainer.training_step` (step losses, skipped steps); the
    NaN guard and the gradient-norm check (dstrain/train/faults.py) report non-finite values here
    instead of stopping the run."""

    def __init__(self, trainer):
        self.trainer, self.args = trainer, trainer.args
        self.detector = SpikeDetector(self.args.spike_window, self.args.spike_threshold)
        self.rollbacks = 0
        self.skip = (0, 0)  # steps in (first, last] run no forward pass
        self.lowered = (0, 0)  # steps in (first, last] train at spike_lr_factor x the scheduled rate
        self.step_loss = None  # this rank's loss for the current step (a device tensor: no sync per micro-batch)
        self.nonfinite = False  # set during the current step by the NaN guard (a device bool) or the gradient-norm check
        self.skipped_since_log = 0
        self.applied_lr = None
        self._training_step = trainer.training_step
        trainer.training_step = self._train_or_skip
        trainer.callback_handler.callbacks.insert(0, _SkippedStepLogs(self))  # before the reporters read a log

    # ---- the step ----
    def skips(self, step: int) -> bool:
        return self.skip[0] < step <= self.skip[1]

    def _train_or_skip(self, model, inputs, num_items_in_batch=None):
        if self.skips(self.trainer.state.global_step + 1):
            return torch.zeros((), device=self.args.device)  # no forward, no backward: nothing to undo
        loss = self._training_step(model, inputs, num_items_in_batch)
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss
        return loss

    def lowers(self, step: int) -> bool:
        return self.lowered[0] < step <= self.lowered[1]

    def on_step_begin(self, args, state, control, **kwargs):
        if self.lowers(state.global_step + 1):
            # The scheduler sets each group's rate again after every step, so this lasts one step.
            groups = self._optimizer().param_groups
            for group in groups:
                group["lr"] *= args.spike_lr_factor
            self.applied_lr = (state.global_step + 1, groups[0]["lr"])  # logged for this step, not the schedule's

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.skips(step):
            self.skipped_since_log += 1
            self._count_skipped_step()
            return control
        loss, nonfinite = self._agree_on_step_loss()
        reason = "a non-finite loss or gradient norm" if nonfinite else self.detector.verdict(loss)
        if reason is None:
            self.detector.add(step, loss)
        else:
            self._roll_back(step, loss, reason, control)
        return control

    def _agree_on_step_loss(self) -> tuple[float, bool]:
        """The step's loss as HF logs it (each rank's sum over its micro-batches, averaged over ranks) and
        whether any rank saw a non-finite value: one all-reduce, the same answer on every rank."""
        local = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        if self.step_loss is not None:
            local[0] = self.step_loss.detach().double()
        local[1] = float(self.nonfinite)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
            world = dist.get_world_size()
        self.step_loss, self.nonfinite = None, False
        total, nonfinite = local.tolist()
        return total / world, nonfinite > 0 or not math.isfinite(total)

    # ---- the rollback ----
    def _roll_back(self, step: int, loss: float, reason: str, control) -> None:
        args = self.args
        if self.rollbacks >= args.spike_max_rollbacks:
            raise UserError(f"step {step}: loss spike ({reason}) after {self.rollbacks} rollbacks "
                            f"(--spike_max_rollbacks {args.spike_max_rollbacks}); stopping: resume with "
                            "--resume_from_checkpoint last and a lower learning rate, or check the data")
        checkpoint = _agreed_checkpoint(args.output_dir, step)
        if checkpoint is None:
            raise UserError(f"step {step}: loss spike ({reason}) and no complete checkpoint in {args.output_dir} "
                            "to roll back to yet; lower --save_steps or the learning rate")
        restored = int(CHECKPOINT_NAME.match(checkpoint.name).group(1))
        load_weights_and_optimizer(self.trainer, checkpoint)
        self.rollbacks += 1
        last_skipped = step + args.spike_skip_batches
        self.skip = (step, last_skipped)
        self.lowered = (last_skipped, last_skipped + args.spike_lr_steps) if args.spike_lr_factor < 1 else (0, 0)
        self.detector.forget_after(restored)
        lowered = (f"; learning rate x{args.spike_lr_factor:g} for steps {self.lowered[0] + 1}..{self.lowered[1]}"
                   if self.lowered[1] > self.lowered[0] else "")
        print0(f"Loss spike at step {step}: {reason}. Rollback {self.rollbacks} of {args.spike_max_rollbacks}: "
               f"weights and optimizer of {checkpoint.name}; batches {restored + 1}..{last_skipped} of the data "
               f"order skipped ({last_skipped - restored}){lowered}")
        # An entry of its own (trainer_state.json, WandB, the console), through HF's Trainer.log: TRL's
        # trainers override log to add, and then clear, the metrics they gathered for this step's own entry.
        # Logging resets should_log, which that entry, logged after the callbacks, still needs.
        should_log = control.should_log
        Trainer.log(self.trainer, {"spike_rollback": self.rollbacks, "spike_loss": loss,
                                   "spike_restored_step": restored, "spike_skipped_batches": last_skipped - restored})
        control.should_log = should_log

    def _optimizer(self):
        engine = self.trainer.model_wrapped
        return engine.optimizer if self.trainer.is_deepspeed_enabled else self.trainer.optimizer

    def _count_skipped_step(self) -> None:
        """A skipped step ran no engine step: move DeepSpeed's own step counter (its checkpoint tags are
        global_step<counter>) and, where the engine owns it, the learning-rate schedule, as a step would."""
        if not self.trainer.is_deepspeed_enabled:
            return  # HF's loop stepped the scheduler; the optimizer found no gradients and changed nothing
        engine = self.trainer.model_wrapped
        engine.global_steps += 1
        engine.global_samples += engine.train_batch_size()
        if isinstance(self.trainer.lr_scheduler, DeepSpeedSchedulerWrapper) and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()

    # ---- kept in every checkpoint ----
    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "skip": list(self.skip), "lowered": list(self.lowered),
                "window": [list(item) for item in self.detector.history]}

    def save(self, checkpoint: str) -> None:
        (Path(checkpoint) / STATE_FILE).write_text(json.dumps(self.state_dict()))

    def restore(self, checkpoint: str | None) -> None:
        path = Path(checkpoint) / STATE_FILE if checkpoint else None
        if path is None or not path.is_file():
            return
        saved = json.loads(path.read_text())
        self.rollbacks, self.skip, self.lowered = saved["rollbacks"], tuple(saved["skip"]), tuple(saved["lowered"])
        self.detector = SpikeDetector(self.args.spike_window, self.args.spike_threshold,
                                      [tuple(item) for item in saved["window"]])


class _SkippedStepLogs(TrainerCallback):
    """HF adds a skipped step's loss as 0 to the interval it logs: leave those steps out of the mean (and
    log no loss for an interval of skipped steps only); a lowered step logs the learning rate it trained
    at, not the schedule's. Runs first, before the reporters read the entry."""

    def __init__(self, rollback: SpikeRollback):
        self.rollback, self.last_logged = rollback, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_logged = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:
            return
        interval = state.global_step - self.last_logged
        skipped, self.rollback.skipped_since_log = self.rollback.skipped_since_log, 0
        self.last_logged = state.global_step
        entry = state.log_history[-1] if state.log_history and state.log_history[-1].get("step") == state.global_step \
            else {}
        lowered = self.rollback.applied_lr
        if lowered and lowered[0] == state.global_step and "learning_rate" in logs:
            logs["learning_rate"] = entry["learning_rate"] = lowered[1]
        if not skipped:
            return
        if skipped >= interval:
            logs.pop("loss")
            entry.pop("loss", None)
        else:
            logs["loss"] = entry["loss"] = logs["loss"] * interval / (interval - skipped)
        logs["skipped_batches"] = entry["skipped_batches"] = skipped


def _agreed_checkpoint(output_dir, before_step: int) -> Path | None:
    """The newest complete checkpoint of a step before `before_step` (an --overwrite_output_dir run may sit
    beside an earlier run's later ones), as rank 0 sees it, on every rank (a shared file system may show
    the ranks different states of a folder being renamed)."""
    chosen = [None]
    if is_main_process():
        earlier = [folder for folder in checkpoint_folders(output_dir)
                   if int(CHECKPOINT_NAME.match(folder.name).group(1)) < before_step]
        chosen = [next((folder for folder in reversed(earlier) if incomplete_reason(folder) is None), None)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def load_weights_and_optimizer(trainer, checkpoint: Path) -> None:
    """Put the checkpoint's weights and optimizer state into the running trainer; the step counters and
    the learning-rate schedule keep their current values."""
    if trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        counters = engine.global_steps, engine.global_samples, engine.skipped_steps
        config = engine._config
        universal = config.load_universal_checkpoint  # set when this run itself resumed on another world size
        config.load_universal_checkpoint = False  # the checkpoint was written by this run: the usual shards
        try:
            loaded, _ = engine.load_checkpoint(str(checkpoint), tag=deepspeed_tag(checkpoint),
                                               load_module_strict=not hasattr(trainer.model, "peft_config"),
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = universal
        if loaded is None:
            raise UserError(f"{checkpoint}: DeepSpeed could not load it for the rollback")
        engine.global_steps, engine.global_samples, engine.skipped_steps = counters
    else:
        schedule = trainer.lr_scheduler.state_dict()
        trainer._load_from_checkpoint(str(checkpoint))
        trainer._load_optimizer_and_scheduler(str(checkpoint))
        trainer.lr_scheduler.load_state_dict(schedule)
