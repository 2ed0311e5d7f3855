"""--eval_tasks: lm-evaluation-harness benchmarks at every evaluation of a training run, their scores
logged beside eval_loss (`eval_<task>/<metric>`: WandB draws them as curves under eval/), added to
the metrics `evaluate` returns (eval_results.json, --metric_for_best_model) and kept in
trainer_state.json.

The tasks are found and their data loaded when the run starts (`prepare_eval_tasks`, from
start_run), so a misspelt name or a dataset missing offline stops the run before any work. At each
evaluation every rank takes part, in one of two ways:

- weights whole on every rank (one process, DDP, ZeRO-1/2): data parallel, each rank scores every
  world_size-th item and rank 0 gathers the results, then hands the scores to every rank;
- weights sharded (ZeRO-3): each forward pass gathers parameters from all ranks, so all must make
  the same passes in the same order: every rank evaluates every item (the same inputs, so the same
  number of batches), generation runs with synced_gpus (a rank whose answer stops early keeps
  stepping with the others), and rank 0's scores are the ones logged.

Nothing waits in a collective while one rank works alone. The harness seeds Python, numpy and torch
for its few-shot draws; the training's random states are put back afterwards, so a run with
--eval_tasks trains exactly as one without.
"""

import copy
import io
import time
from contextlib import nullcontext, redirect_stderr
from dataclasses import dataclass

import torch.distributed as dist
from transformers import TrainerCallback

from dstrain.distributed import print0
from dstrain.errors import UserError
from dstrain.eval.harness import (
    HarnessSettings,
    LoadedModelLM,
    evaluate,
    hub_reachable,
    load_tasks,
    quiet_harness,
    read_from_local_cache_only,
    scores,
    split_names,
    task_manager_for,
)
from dstrain.model.loading import context_length


@dataclass
class EvalTasks:
    """The tasks --eval_tasks names, found, with the settings to run them."""

    settings: HarnessSettings
    manager: object  # lm_eval.tasks.TaskManager


def prepare_eval_tasks(args) -> EvalTasks | None:
    """Find the --eval_tasks tasks and load their data now, on every rank."""
    if not args.eval_tasks:
        return None
    quiet_harness()
    settings = HarnessSettings(
        tasks=split_names(args.eval_tasks), num_fewshot=args.eval_tasks_num_fewshot, limit=args.eval_tasks_limit,
        batch_size=args.eval_tasks_batch_size or args.per_device_eval_batch_size,
        include_paths=tuple(args.eval_tasks_include_path or ()), apply_chat_template=args.eval_tasks_chat_template,
        bootstrap_iters=0)  # no standard errors: only the scores are logged
    manager, all_local = task_manager_for(settings.tasks, settings.include_paths, "--eval_tasks")
    if not all_local and not hub_reachable():
        read_from_local_cache_only()
    load_tasks(manager, settings.tasks, "--eval_tasks")
    return EvalTasks(settings, manager)


def weights_are_sharded(args) -> bool:
    """ZeRO-3 (or FSDP): no rank holds every weight outside a forward pass."""
    deepspeed = getattr(args, "hf_deepspeed_config", None)
    return bool((deepspeed is not None and deepspeed.is_zero3()) or args.fsdp)


class HarnessEvaluation(TrainerCallback):
    """See the module docstring."""

    def __init__(self, trainer, tasks: EvalTasks):
        model = trainer.model
        if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
            raise UserError(f"--eval_tasks needs a causal language model; this run trains a {type(model).__name__}")
        if tasks.settings.apply_chat_template and not getattr(trainer.processing_class, "chat_template", None):
            raise UserError("--eval_tasks_chat_template: the tokenizer has no chat template")
        self.trainer, self.tasks = trainer, tasks
        self.sharded = weights_are_sharded(trainer.args)
        # The harness gives a tokenizer without a pad token one; the run saves its own, untouched.
        self.tokenizer = copy.deepcopy(trainer.processing_class)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        start = time.perf_counter()
        model = self.trainer.model
        was_training = model.training
        lm = LoadedModelLM(model, self.tokenizer, self.tasks.settings.batch_size, data_parallel=not self.sharded,
                           synced_generation=self.sharded, max_length=context_length(model.config))
        # Evaluating everything, every rank is rank 0 to the harness and would draw its progress bars.
        quiet = nullcontext() if state.is_world_process_zero else redirect_stderr(io.StringIO())
        try:
            with quiet:
                results = evaluate(lm, self.tasks.settings, self.tasks.manager)
        finally:
            model.train(was_training)
        found = [scores(results) if results is not None else None]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(found, src=0)
        logged = {f"eval_{name}": value for name, value in found[0].items()}
        logged["eval_tasks_runtime"] = round(time.perf_counter() - start, 4)
        print0("Benchmarks at step {}: {}".format(
            state.global_step, ", ".join(f"{name} {value:.4f}" for name, value in logged.items())))
        if metrics is not None:
            metrics.update(logged)
        self.trainer.log(logged)


def add_harness_evaluation(trainer, tasks: EvalTasks) -> HarnessEvaluation:
    callback = HarnessEvaluation(trainer, tasks)
    trainer.add_callback(callback)
    return callback
