"""Is the run healthy and fast? Throughput, MFU, memory and sample generations at each logging step.

HF's Trainer already logs loss, learning rate and grad norm, and its WandbCallback already starts
the WandB run on rank 0 with the training arguments and the model config. `TrainingMonitor`
adds, to the same log entries (so they reach WandB, the console and trainer_state.json alike):

    tokens_seen                   non-padding tokens trained so far, all ranks (kept in checkpoints)
    tokens_per_second             all ranks together, over the last logging interval
    tokens_per_second_per_device
    trained_tokens_per_second     tokens whose label counts in the loss (SFT: the assistant replies)
    samples_per_second            sequences (packed rows count as one) over the interval
    step_time                     seconds per optimizer step over the interval
    mfu                           model FLOPs utilisation: `training_flops` of the interval's tokens over
                                  the devices' peak (PEAK_TFLOPS, or --peak_tflops); GPU, or CPU with the flag
    hfu                           hardware FLOPs utilisation: the same plus the forward pass recomputed under
                                  activation checkpointing (equal to mfu without it)
    peak_memory_gb                the largest rank's peak: torch.cuda.max_memory_allocated on GPU,
                                  the process's max resident set (ru_maxrss) on CPU
    eval_perplexity               exp(eval_loss), beside every eval_loss

Tokens are counted by a forward pre-hook on the trained model, which sees exactly what is trained
(TRL's concatenated preference pairs, a sequence-parallel rank's slice, a flattened packed batch):
real tokens are the attention mask's ones, else those that are not the pad token (packed SFT rows
pad with a segment of their own), else every position (blocks). Attention is charged per document:
its FLOPs grow with the square of the length each token attends over, and the sum of L^2 over a
row's documents is the sum over its tokens of 2p+1, p the token's position in its own document
(position_ids, which restart at each packed conversation or --document_mask document). All of it
is device arithmetic queued behind the forward: nothing waits for the device per micro-batch (the
shapes are read on the host); the ranks' counts are read and summed with one all_gather per
logging step.
With --sample_every N, every N steps each prompt of --sample_prompts is continued greedily and
the result printed and logged as a WandB table; every rank takes part (under ZeRO-3 the weights
are sharded, so generation needs them all: synced_gpus), rank 0 alone prints and logs.
"""

import json
import math
import os
import re
import resource
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from dstrain.distributed import print0
from dstrain.errors import UserError

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOPs, matched in
# order against torch.cuda.get_device_name(); more specific names first. Word boundaries keep
# "A10" from matching "A100" or "A10G", "L40" from "L40S", "H200" from "GH200".
PEAK_TFLOPS = [
    (r"\bB200\b", 2250.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b|\bH800\b|\bH200\b|\bGH200\b", 989.0),
    (r"\bA100\b|\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX ?6000 ?Ada\b", 364.0),  # "NVIDIA RTX 6000 Ada Generation"
    (r"\bA6000\b", 155.0),
    (r"\b4090\b", 165.0),
    (r"\b3090\b", 71.0),
    (r"\bV100\b", 125.0),  # no bf16 on V100: its fp16 tensor-core peak
    (r"\bT4\b", 65.0),  # fp16, as V100
    (r"\bMI300X\b", 1307.0),
    (r"\bMI250X?\b", 383.0),
]

DEFAULT_SAMPLE_PROMPTS = ["Once upon a time", "The meaning of life is", "def fibonacci(n):"]


# ===== pure derivations =====

def peak_tflops_for(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOPs from PEAK_TFLOPS, or None for a device not in it."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def training_flops_per_token(parameters: int, trainable: int, layers: int, hidden: int, seq_len: int) -> float:
    """FLOPs to train on one token: 2 per weight forward, 2 backward for the activations' gradient,
    2 more for the weight's own gradient where it is trained (6N when every weight is; LoRA's frozen
    weights cost 4), plus attention's scores and weighted sum, 4 * seq_len * hidden per layer forward,
    twice that backward (PaLM appendix B: 6N + 12 * layers * hidden * seq_len).
    Recomputation under activation checkpointing is not counted, as MFU's definition asks."""
    return 4 * parameters + 2 * trainable + 12 * layers * hidden * seq_len


def _numel(parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 leaves an empty tensor; ds_numel is the size


def matmul_parameter_counts(model) -> tuple[int, int]:
    """(parameters, trainable ones) that take part in a matrix product for every token: all of them
    (tied weights once, ZeRO-3 shards at their full size) except an input embedding that is only
    looked up. A tied embedding stays: it is the output layer's product."""
    unique = {id(p): p for p in model.parameters()}.values()
    parameters = sum(_numel(p) for p in unique)
    trainable = sum(_numel(p) for p in unique if p.requires_grad)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is not None and (output is None or output.weight is not embedding.weight):
        parameters -= _numel(embedding.weight)
        trainable -= _numel(embedding.weight) if embedding.weight.requires_grad else 0
    return parameters, trainable


def peak_memory_bytes(device: torch.device) -> int:
    """The peak of this process: allocated by torch on a GPU; on CPU the resident set (ru_maxrss is
    KiB on Linux), which includes the libraries and the data, not tensors alone."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batch_counts(input_ids: torch.Tensor, real: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """[real tokens, trained tokens, attention units] of one micro-batch, as a float64 tensor on its
    device (no synchronisation). `real`: True where a token is not padding (None: every position).
    Attention units: the sum over documents of length^2, i.e. over real tokens of 2p+1 with p the
    position in the token's document (position_ids; without them the row is one document, padding
    left out). Trained tokens: labels other than -100 after the causal shift (as HF's loss counts
    them), or `shift_labels` as given (sequence parallelism shifts them before slicing)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real.bool()
    if position_ids is None:
        position_ids = real.long().cumsum(-1) - 1
    units = ((2 * position_ids.long() + 1) * real).sum()
    if shift_labels is not None:
        trained = (shift_labels != -100).sum()
    elif labels is not None:
        trained = (labels[..., 1:] != -100).sum()
    else:
        trained = torch.zeros((), dtype=torch.long, device=input_ids.device)
    return torch.stack([real.sum(), trained, units]).double()


def training_flops(parameters: int, trainable: int, layers: int, hidden: int, tokens: float,
                   attention_units: float, recompute: bool = False) -> float:
    """FLOPs to train on `tokens` tokens whose attention spans sum to `attention_units` (sum of L^2 over
    documents): `training_flops_per_token` with each token at its own document's length. `recompute`:
    activation checkpointing runs every forward twice, adding 2 per weight and 4 * hidden * L per layer
    for attention (hardware FLOPs, for HFU; MFU leaves them out)."""
    flops = (4 * parameters + 2 * trainable) * tokens + 12 * layers * hidden * attention_units
    if recompute:
        flops += 2 * parameters * tokens + 4 * layers * hidden * attention_units
    return flops


def real_token_filter(model) -> int | None:
    """The pad token id when it marks padding alone (it is set and is not also the eos or bos token,
    which real text contains), else None: then rows without an attention mask count every position."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    text = []
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        text += value if isinstance(value, list) else [value]
    return None if pad is None or pad in text else pad


def model_shape(model) -> tuple[int, int]:
    """(layers, hidden size) from the model's config, 0 for what a config does not name."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0
    return int(layers), int(hidden)


# ===== the run's environment (dstrain/train/run.py) and its flags =====

def set_wandb_environment(args) -> None:
    """Hand the WandB flags to wandb through its own variables, before anything starts a run (the
    data audit may start it, before the Trainer's callback does); flags win over WANDB_* already
    set. The run files (offline runs included) go beside the run, not into the current folder."""
    if "wandb" not in args.reporting_targets():
        return
    os.environ.setdefault("WANDB_DIR", os.path.abspath(os.path.expanduser(args.output_dir or ".")))
    os.environ["WANDB_PROJECT"] = args.wandb_project or os.environ.get("WANDB_PROJECT") or "dstrain"
    for value, variable in ((args.wandb_group, "WANDB_RUN_GROUP"), (args.wandb_tags, "WANDB_TAGS")):
        if value:
            os.environ[variable] = value


def load_prompts(values: list[str] | None) -> list[str]:
    """--sample_prompts: the prompts themselves, or one file: .json (a list of strings) or text
    (one prompt per line). None: DEFAULT_SAMPLE_PROMPTS."""
    if not values:
        return list(DEFAULT_SAMPLE_PROMPTS)
    if len(values) > 1 or not values[0].endswith((".txt", ".json")):
        return list(values)
    path = Path(values[0])
    if not path.is_file():
        raise UserError(f"--sample_prompts: no file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts) or not prompts:
            raise UserError(f"{path}:1: expected a JSON list of non-empty strings")
        return prompts
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path}:1: no prompt in the file (one per line)")
    return prompts


# ===== the callback =====

class TrainingMonitor(TrainerCallback):
    """See the module docstring. It must run before the reporting callbacks: `add_monitoring`."""

    def __init__(self, trainer, logged_arguments: tuple = ()):
        self.trainer = trainer
        self.args = trainer.args
        self.logged_arguments = logged_arguments  # the run's other argument dataclasses, for its WandB config
        self.peak_tflops = self.args.peak_tflops
        if self.peak_tflops is None and torch.cuda.is_available():
            self.peak_tflops = peak_tflops_for(torch.cuda.get_device_name())
            if self.peak_tflops is None:
                print0(f"No peak FLOPs known for {torch.cuda.get_device_name()}: pass --peak_tflops to log MFU")
        self.hook = None
        self.counts = None  # [tokens, trained tokens, attention units] since the last log, this rank, on its device
        self.pad_token_id = None  # set at train begin: real_token_filter
        self.sequences = 0.0  # rows since the last log, this rank (a host number: shapes need no device)
        self.last_time = self.last_step = None
        self.config_logged = False
        self.samples = []  # [step, prompt, completion] rows; WandB tables cannot grow, so each log resends all

    # ---- counting, on every forward that trains ----
    def _count(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not (module.training and torch.is_grad_enabled()) or not isinstance(input_ids, torch.Tensor):
            return  # eval, generation, a reference model's no-grad pass
        mask = kwargs.get("attention_mask")
        real = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if real is None and self.pad_token_id is not None:
            real = input_ids != self.pad_token_id
        # Under --sequence_parallel_size N each rank holds 1/N of every sequence: its tokens (and their
        # positions' 2p+1) are its own, summed over ranks they count once; a sequence is shared by N ranks.
        batch = batch_counts(input_ids, real, kwargs.get("position_ids"), kwargs.get("labels"),
                             kwargs.get("shift_labels"))
        self.counts = batch if self.counts is None else self.counts + batch
        self.sequences += input_ids.shape[0] / getattr(self.args, "sequence_parallel_size", 1)

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self.parameters, self.trainable = matmul_parameter_counts(model)
        self.layers, self.hidden = model_shape(model)
        self.pad_token_id = real_token_filter(model)
        self.recompute = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
                              or getattr(model, "is_activation_checkpointing", False))  # set by HF's enable call
        self.last_time, self.last_step = time.perf_counter(), state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def on_step_begin(self, args, state, control, **kwargs):
        # Here rather than on_train_begin: this callback runs first, before WandbCallback starts the run.
        if not self.config_logged and state.is_world_process_zero and self._wandb_run() is not None:
            self._wandb_run().config.update(self.run_config(), allow_val_change=True)
        self.config_logged = True

    # ---- metrics, at every logging step (every rank calls on_log, so the all_gather is safe) ----
    def on_log(self, args, state, control, logs=None, **kwargs):
        added = {}
        for runtime in ("eval_runtime", "eval_tasks_runtime"):  # evaluation (and --eval_tasks' benchmarks)
            if runtime in logs and self.last_time is not None:  # is no training step: keep it out of step_time
                self.last_time += logs[runtime]
        if "eval_loss" in logs:
            added["eval_perplexity"] = math.exp(logs["eval_loss"]) if logs["eval_loss"] < 700 else float("inf")
        if "loss" in logs and self.last_time is not None:
            added |= self._interval_metrics(state)
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)  # the Trainer stored a copy of `logs` before the callbacks

    def _interval_metrics(self, state) -> dict:
        device = self.args.device
        local = torch.zeros(3, dtype=torch.float64, device=device) if self.counts is None else self.counts.to(device)
        host = torch.tensor([self.sequences, float(peak_memory_bytes(device))], dtype=torch.float64)
        local = torch.cat([local, host.to(device)])
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            gathered = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(gathered, local)
            every = torch.stack(gathered)
            local = torch.cat([every[:, :4].sum(0), every[:, 4].max().unsqueeze(0)])
        tokens, trained, units, sequences, memory = local.tolist()
        self.counts, self.sequences = None, 0.0
        now, steps = time.perf_counter(), max(state.global_step - self.last_step, 1)
        seconds = max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, state.global_step
        if self.args.include_num_input_tokens_seen == "no":  # otherwise the Trainer counts them itself
            state.num_input_tokens_seen += int(tokens)
        metrics = {
            "tokens_seen": state.num_input_tokens_seen,
            "tokens_per_second": tokens / seconds,
            "tokens_per_second_per_device": tokens / seconds / world,
            "samples_per_second": sequences / seconds,
            **({"trained_tokens_per_second": trained / seconds} if trained else {}),
            "step_time": seconds / steps,
            "peak_memory_gb": memory / 2**30,
        }
        if self.peak_tflops:
            peak = seconds * self.peak_tflops * 1e12 * world
            shape = (self.parameters, self.trainable, self.layers, self.hidden, tokens, units)
            metrics["mfu"] = training_flops(*shape) / peak
            metrics["hfu"] = training_flops(*shape, recompute=self.recompute) / peak
        return metrics

    # ---- sample generations ----
    def on_step_end(self, args, state, control, **kwargs):
        if args.sample_every and state.global_step % args.sample_every == 0:
            self.generate_samples(state)

    def generate_samples(self, state) -> None:
        model, tokenizer = self.trainer.model, self.trainer.processing_class
        if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: True)()) or tokenizer is None:
            print0("--sample_every: this model does not generate text; no samples")
            self.args.sample_every = 0
            return
        was_training, rows, start = model.training, [], time.perf_counter()
        model.eval()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        with torch.no_grad():
            for prompt in self.args.sample_prompts:
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.args.device)
                # Every rank runs the same prompts; synced_gpus keeps ZeRO-3's gathers in step
                # even when one rank's generation would stop earlier.
                output = model.generate(**ids, max_new_tokens=self.args.sample_max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                        synced_gpus=world > 1)
                rows.append([state.global_step, prompt, tokenizer.decode(output[0, ids["input_ids"].shape[1]:])])
        model.train(was_training)
        if self.last_time is not None:
            self.last_time += time.perf_counter() - start  # nor is generating: keep it out of step_time
        if not state.is_world_process_zero:
            return
        print0(f"Samples at step {state.global_step}:\n" + "\n".join(f"  {p!r} -> {c!r}" for _, p, c in rows))
        self.samples += rows
        run = self._wandb_run()
        if run is not None:
            import wandb

            run.log({"samples/generations": wandb.Table(columns=["step", "prompt", "completion"], data=self.samples),
                     "train/global_step": state.global_step})

    # ---- the run's whole configuration ----
    def run_config(self) -> dict:
        """What WandbCallback does not log: our other argument dataclasses, the DeepSpeed config with
        its "auto" values resolved, and the FLOPs accounting."""
        config = {"run_arguments": {type(a).__name__: _plain(asdict(a))
                                    for a in self.logged_arguments if is_dataclass(a)}}
        deepspeed = getattr(self.args, "hf_deepspeed_config", None)
        if deepspeed is not None:
            config["deepspeed_config"] = _plain(deepspeed.config)
        config["monitoring"] = {"matmul_parameters": self.parameters, "trainable_parameters": self.trainable,
                                "peak_tflops_per_device": self.peak_tflops,
                                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        return config

    def _wandb_run(self):
        if "wandb" not in self.args.reporting_targets():
            return None
        import wandb  # only when reporting to WandB: importing it costs a second

        return wandb.run


def _plain(values):
    """JSON-safe (paths, enums, torch dtypes become strings) for the run config."""
    return json.loads(json.dumps(values, default=str))


def add_monitoring(trainer, logged_arguments: tuple = ()) -> TrainingMonitor:
    """Attach the monitor ahead of every other callback: the metrics it adds to a log entry must be
    there before the reporting callbacks (WandB, the console printer) read it. `logged_arguments`
    (the run's other argument dataclasses) go into the WandB run config."""
    monitor = TrainingMonitor(trainer, logged_arguments)
    trainer.callback_handler.callbacks.insert(0, monitor)
    return monitor
