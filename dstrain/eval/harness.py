"""Benchmarks through EleutherAI's lm-evaluation-harness, on a model already loaded: eval.py's model
or adapter (dstrain/infer/model_loading.py), or the model being trained (--eval_tasks,
dstrain/train/eval_tasks.py).

The harness's own HF backend (`HFLM`) does the scoring: log-likelihoods of the choices, rolling
perplexities, greedy generation with the task's stop sequences, chat templates. What it lacks, and
`LoadedModelLM` adds: data parallelism for a model passed in already loaded (the harness sets that up
only for a model it loads itself, through `accelerate launch` on GPUs), through torch.distributed, so
it works on CPU ranks (gloo) as on GPUs (nccl); and generation that keeps ZeRO-3's parameter gathers
in step across ranks (synced_gpus).

Tasks are found in the shipped folder (eval_tasks/, data generated locally: no network), then in any
--include_path folder, and only then among the harness's ~15,000 built-in ones (indexing those
takes about 5 s, so it is skipped when every name is local). Built-in tasks read their data through
`datasets`: offline, from its local cache.
"""

import difflib
import json
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from dstrain.errors import UserError

LOCAL_TASKS = Path(__file__).resolve().parents[2] / "eval_tasks"


@dataclass(frozen=True)
class HarnessSettings:
    """What to run and how: the harness's own knobs, as eval.py and --eval_tasks name them."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None  # items per task (a fraction when below 1)
    batch_size: int = 8
    include_paths: tuple[str, ...] = ()
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    seed: int = 1234
    log_samples: bool = False
    bootstrap_iters: int = 100_000  # standard errors of non-mean metrics; 0 skips them

    def __post_init__(self):
        if not self.tasks or not all(self.tasks):
            raise UserError("--tasks: give one or more task names, comma-separated")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"--num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive, got {self.limit}")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise UserError("--fewshot_as_multiturn needs --apply_chat_template")
        for path in self.include_paths:
            if not Path(path).is_dir():
                raise UserError(f"--include_path: no folder at {path}")


def split_names(value: str | None) -> tuple[str, ...]:
    """'arc_easy, hellaswag' -> ('arc_easy', 'hellaswag')."""
    return tuple(name.strip() for name in (value or "").split(",") if name.strip())


def quiet_harness() -> None:
    """The harness logs every step at INFO and warns about what is intended here (a model passed in
    loaded, which LoadedModelLM is for; custom_dataset tasks, which the shipped ones are): keep its errors."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


# ===== finding the tasks =====

def task_manager_for(names: tuple[str, ...], include_paths: tuple[str, ...] = (),
                     flag: str = "--tasks") -> tuple[TaskManager, bool]:
    """A TaskManager that knows every name in `names`, and whether they are all local: the shipped
    tasks and --include_path folders first; the harness's built-in tasks (which read their data from
    the hub or its local cache) only when a name is not among those. An unknown name is an error
    listing the closest known ones."""
    paths = [str(LOCAL_TASKS), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not _unknown(manager, names):
        return manager, True
    manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = _unknown(manager, names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"{flag}: no task, group or tag named '{unknown[0]}'{hint}; your own task YAMLs go "
                        "in a folder given with --include_path")
    return manager, False


def _unknown(manager: TaskManager, names: tuple[str, ...]) -> list[str]:
    known = set(manager.all_tasks)
    return [name for name in names if name not in known and not Path(name).is_file()]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT: huggingface.co or a mirror) answers a connection within `timeout`."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def read_from_local_cache_only() -> None:
    """Offline: datasets and huggingface_hub read the local cache and never try the network (each
    attempt would otherwise retry for about 20 s before failing). Both read these flags at call time."""
    import datasets
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_tasks(manager: TaskManager, names: tuple[str, ...], flag: str = "--tasks") -> dict:
    """The tasks with their data, loaded now so that a missing dataset stops the run before any model
    work; returns the harness's {"tasks", "groups", "group_map"}."""
    try:
        return manager.load(list(names))
    except ConnectionError as error:  # datasets' "Couldn't reach ... on the Hub" (offline, nothing cached)
        raise UserError(f"{flag}: {str(error).splitlines()[0]}; its data is not in the local datasets cache "
                        "(HF_DATASETS_CACHE): run this once where the hub can be reached, or use local tasks "
                        "(--include_path)") from None


# ===== the model, as the harness sees it =====

class LoadedModelLM(HFLM):
    """The harness's HF backend over a model we loaded (a PeftModel, a ZeRO-3 partitioned module),
    taking part in data parallelism through torch.distributed when `data_parallel`.

    With `data_parallel` each rank scores its share of the requests (every world_size-th document) and
    rank 0 gathers the results: right for a model whose every rank holds all the weights. Under ZeRO-3
    each forward pass gathers parameters from every rank, so every rank must make the same passes:
    there every rank evaluates everything (data_parallel False) and generation runs with synced_gpus,
    so a rank that meets its stop sequence early keeps stepping with the others.
    """

    def __init__(self, model, tokenizer, batch_size: int, data_parallel: bool = False,
                 synced_generation: bool = False, max_length: int | None = None):
        # HFLM re-ties the embeddings of the model it is given. Ours are tied already, and re-tying breaks
        # on an adapter over the output layer (a LoRA-wrapped lm_head has no settable weight) and would
        # touch ZeRO-3's partitioned parameters: skipped, for this call only.
        model.tie_weights = lambda *args, **kwargs: None
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                             softmax_dtype="float32")
        finally:
            del model.tie_weights
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if data_parallel and world > 1:
            self._rank, self._world_size = dist.get_rank(), world
        self.synced_generation = synced_generation and world > 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along the first dimension, as accelerate's gather does."""
        if self.world_size <= 1:
            return tensor
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.synced_generation:
            generation_kwargs["synced_gpus"] = True
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        """The harness's own version asks the hub for the model's commit; ours is a local folder."""
        return {"model_num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self._model.parameters()),
                "model_dtype": str(getattr(self._model, "dtype", ""))}


# ===== running =====

def rng_states() -> tuple:
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_rng_states(states: tuple) -> None:
    python, numpy_state, torch_state, cuda = states
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def evaluate(lm: LoadedModelLM, settings: HarnessSettings, manager: TaskManager) -> dict | None:
    """Run the tasks; the harness's results dict on rank 0, None on the other ranks (simple_evaluate
    returns them where lm.rank and LOCAL_RANK are 0, even when every rank evaluated everything: the
    callers broadcast what they need). The harness seeds Python, numpy and torch for its few-shot draws;
    the callers' random states are put back afterwards (training goes on exactly as without it)."""
    states = rng_states()
    try:
        results = simple_evaluate(
            model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
            batch_size=settings.batch_size, task_manager=manager, log_samples=settings.log_samples,
            apply_chat_template=settings.apply_chat_template, fewshot_as_multiturn=settings.fewshot_as_multiturn,
            system_instruction=settings.system_instruction, bootstrap_iters=settings.bootstrap_iters,
            random_seed=settings.seed, numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    except ConnectionError as error:
        raise UserError(f"--tasks: {str(error).splitlines()[0]}") from None
    finally:
        restore_rng_states(states)
    return results


def scores(results: dict) -> dict[str, float]:
    """{"task/metric": value} for every task and group, stderr left out; a metric under a filter
    other than the harness's default ("none") keeps the filter's name: "exact_match,strip" -> "exact_match_strip"."""
    flat = {}
    for name, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            flat[f"{name}/{metric}" + ("" if filter_name == "none" else f"_{filter_name}")] = float(value)
    return flat


def results_table(results: dict) -> str:
    """The harness's own Markdown table of tasks (and groups, when any)."""
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(path: Path, results: dict, settings: dict) -> None:
    """The harness's results (samples, when logged, in a separate `<name>.samples.jsonl`) with our
    settings, written whole or not at all."""
    samples = results.get("samples")
    report = {"dstrain": settings, **{key: value for key, value in results.items() if key != "samples"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    os.replace(partial, path)
    if samples:
        samples_path = path.with_suffix(".samples.jsonl")
        with open(samples_path, "w", encoding="utf-8") as handle:
            for task, rows in samples.items():
                for row in rows:
                    line = {"task": task, **row}
                    handle.write(json.dumps(line, default=handle_non_serializable, ensure_ascii=False) + "\n")


def log_results_to_wandb(results: dict, project: str | None, run_name: str | None, output: str | None) -> None:
    """The harness's own WandB logger: the results table (`evaluation/eval_results`), each score, the
    task configs and the results JSON as an artifact. Not its per-sample tables: with wandb 0.31 they fail
    on the nested answers of rolling log-likelihood tasks (--log_samples writes them beside --output).
    The run's files go beside --output (or into the current folder); WANDB_MODE=offline keeps them local."""
    import wandb
    from lm_eval.loggers import WandbLogger

    folder = Path(output).resolve().parent if output else Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(init_args={"project": project or os.environ.get("WANDB_PROJECT") or "dstrain",
                                    "name": run_name, "job_type": "eval", "dir": str(folder)})
    logger.post_init(results)
    logger.log_eval_result()
    wandb.finish()
