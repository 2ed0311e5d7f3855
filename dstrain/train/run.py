"""Starting a training run: the process-wide set-up every training script does first, in one visible step.

The process group itself is formed while the arguments are built (HF's TrainingArguments needs it
then on CPU ranks: see `TrainingArguments.__post_init__`); everything else a run changes in its
process happens here, in this order, on every rank.
"""

from dataclasses import dataclass, field

from dstrain.distributed import check_no_stale_build_locks, dump_stacks_on_sigusr1, release_shared_memory_names
from dstrain.errors import UserError
from dstrain.train.monitoring import set_wandb_environment
from dstrain.train.preemption import StopSignals, parse_signals


@dataclass(frozen=True)
class Run:
    """A started run: its training arguments, and the other argument dataclasses its reports log."""

    args: object  # dstrain.arguments.TrainingArguments or a TRL config built on it
    logged_arguments: tuple = ()
    eval_tasks: object = None  # dstrain.train.eval_tasks.EvalTasks: the --eval_tasks benchmarks, found and loaded
    stop: StopSignals = field(default_factory=lambda: StopSignals([]))  # the preemption signals heard


def start_run(training_args, *other_arguments) -> Run:
    """Prepare this process for training; every rank calls it at the top of the script's `main`:
    - `kill -USR1 <pid>` prints every thread's Python stack (the first thing to look at in a hung run);
    - the --preemption_signals (SIGTERM, SIGUSR2) stop the run after the current optimizer step with a
      checkpoint (dstrain/train/preemption.py); before training starts they stop it at once;
    - a DeepSpeed op-build lock left by an interrupted build is an error, not an endless wait;
    - WandB's project, group, tags and run folder are set from the flags;
    - DeepSpeed's CPU all-reduce buffers leave /dev/shm once every rank has opened them (before any
      check below can stop the run, so a refused run does not leak them either);
    - the DeepSpeed JSON must agree with the flags: a contradiction stops the run now, naming both values;
    - the --eval_tasks benchmarks are found and their data loaded: an unknown name or a dataset that is
      not there offline stops the run now, not at the first evaluation.
    """
    dump_stacks_on_sigusr1()
    stop = StopSignals(parse_signals(training_args.preemption_signals))
    stop.install()
    if training_args.deepspeed:
        check_no_stale_build_locks()
    set_wandb_environment(training_args)
    release_shared_memory_names()
    check_deepspeed_config_agrees(training_args)
    eval_tasks = None
    if getattr(training_args, "eval_tasks", None):
        from dstrain.train.eval_tasks import prepare_eval_tasks  # imports lm-evaluation-harness: only when asked

        eval_tasks = prepare_eval_tasks(training_args)
    return Run(training_args, other_arguments, eval_tasks, stop)


def check_deepspeed_config_agrees(args) -> None:
    """Stop at start-up, not after the model is built, when the DeepSpeed JSON contradicts the flags.

    HF's own comparison (`trainer_config_process`) has already run while the arguments were built;
    it only raises later, when the engine starts.
    """
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not config.mismatches:
        return
    source = args.deepspeed if isinstance(args.deepspeed, str) else "the DeepSpeed config"
    clashes = "; ".join(line.lstrip("- ") for line in config.mismatches)
    raise UserError(f"{source} contradicts the flags: {clashes}. Set those values to \"auto\" or make them agree")
