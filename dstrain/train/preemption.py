"""Preemption: a signal ends the run after the current optimizer step, with a complete checkpoint and
exit code 75 (PREEMPTED_EXIT_CODE), so the scheduler can run the same command again and it resumes.

Who sends what (read from the code of DeepSpeed 0.19.8 and the schedulers' documentation):
- SLURM (`--signal`, time limit, preemption) signals every process of the job step: the ranks, the
  per-node launcher and the `deepspeed` command alike.
- Kubernetes signals only the container's first process (the launch script) and kills the rest when
  it exits.
- DeepSpeed's per-node launcher (`deepspeed/launcher/launch.py`) answers SIGTERM by sending SIGTERM to
  each rank's process tree *in turn*, SIGKILLing each one 30 s later; the next rank hears nothing until
  the previous one is gone. The `deepspeed` command itself installs no handler on a single node: it
  dies and leaves the node's launcher and ranks running.
The launch/ scripts therefore start DeepSpeed's launcher with these signals blocked (it neither dies
nor starts its 30 s countdown) and forward each one to the ranks themselves (launch/supervise.py);
each rank unblocks them in `start_run`.

Because some ranks may hear the signal and others not (another node, DeepSpeed's one-rank-at-a-time
forwarding), no rank acts on it alone: at the end of every optimizer step all ranks agree with one
small all-reduce (`any_rank`), and if any rank was signalled they all ask the Trainer to save
(`should_save`) and, once the checkpoint is written, to stop. No barrier is ever entered by a subset
of the ranks. A signal that comes before training starts has nothing to save: the rank stops at once.
"""

import signal
import time

from transformers import TrainerCallback

from dstrain.distributed import any_rank, print0
from dstrain.errors import Preempted, UserError

DEFAULT_SIGNALS = "SIGTERM,SIGUSR2"
# SIGUSR1 prints the stacks of a rank that seems hung (dstrain/distributed.py); SIGKILL and SIGSTOP
# cannot be caught.
RESERVED = {"SIGKILL": "cannot be caught", "SIGSTOP": "cannot be caught",
            "SIGUSR1": "prints the stacks of a hung run (kill -USR1)"}


def parse_signals(text: str | None) -> list[signal.Signals]:
    """--preemption_signals "SIGTERM,USR2" -> [SIGTERM, SIGUSR2]; "none" or "" -> []."""
    if not text or text.strip().lower() == "none":
        return []
    found = []
    for name in (part.strip().upper() for part in text.split(",") if part.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in RESERVED:
            raise UserError(f"--preemption_signals: {name} {RESERVED[name]}; choose another (e.g. SIGTERM, SIGUSR2)")
        try:
            found.append(signal.Signals[name])
        except KeyError:
            raise UserError(f"--preemption_signals: unknown signal {name} (e.g. SIGTERM, SIGUSR2, SIGHUP)") from None
    return found


class StopSignals:
    """This process's preemption signals: which one came first and when. Before training a signal stops
    the process at once (nothing to save); during training it is only noted, and `PreemptionCallback`
    acts on it at the next step boundary; after training (final save, evaluation) it is noted and the
    run is left to finish."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals = signals
        self.received: str | None = None
        self.received_at: float | None = None
        self.phase = "before"  # before -> training -> after

    def install(self) -> None:
        for sig in self.signals:
            signal.signal(sig, self._handle)
        # The launch/ scripts start DeepSpeed's launcher with these signals blocked, and the ranks inherit
        # the mask; a signal that came meanwhile is delivered here, as soon as they are unblocked.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def _handle(self, signum, frame) -> None:
        # No printing here: the main thread may be inside a write to the same stream.
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum).name, time.monotonic()
        if self.phase == "before":
            raise Preempted(f"{self.received} before training began: nothing to save; run the same command "
                            "again to start", orderly=False)

    def seconds_since(self) -> float:
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0


class PreemptionCallback(TrainerCallback):
    """At each optimizer step's end: if any rank was signalled, save now and stop once saved."""

    def __init__(self, stop: StopSignals):
        self.stop, self.stopped_at, self.saved_after = stop, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.phase = "training"
        if self.stop.received:  # came while the model and data were loading (blocked by the launcher until now)
            print0(f"{self.stop.received} received before the first step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and any_rank(self.stop.received is not None):
            self.stopped_at = state.global_step
            heard = f"{self.stop.received} {self.stop.seconds_since():.1f} s ago" if self.stop.received else \
                "a preemption signal on another rank"
            print0(f"Preemption ({heard}): saving checkpoint-{state.global_step} and stopping")
            control.should_save = True
            control.should_evaluate = False  # the grace period is for the checkpoint
            if state.is_world_process_zero and "wandb" in args.reporting_targets():
                import wandb  # only when reporting to WandB: importing it costs a second

                if wandb.run is not None:
                    wandb.run.mark_preempting()  # WandB shows the run as preempted, not crashed
        return control

    def on_save(self, args, state, control, **kwargs):
        # Stop only once the checkpoint is written: the TrainerControl saved with it must not say "stop".
        if self.stopped_at == state.global_step:
            self.saved_after = self.stop.seconds_since()
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.phase = "after"

    def preempted(self, state) -> Preempted | None:
        """The exception that ends a run stopped before its last step (None when it finished anyway)."""
        if self.stopped_at is None or state.global_step >= state.max_steps:
            return None
        signal_name = self.stop.received or "a preemption signal (on another rank)"
        written = f", written {self.saved_after:.1f} s after the signal" if self.saved_after is not None else ""
        return Preempted(f"stopped by {signal_name} after step {self.stopped_at} of {state.max_steps}: "
                         f"checkpoint-{self.stopped_at} is complete{written}; run the same command with "
                         "--resume_from_checkpoint last to continue", orderly=True)
