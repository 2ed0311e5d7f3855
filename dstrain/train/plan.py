"""A plan before launch (plan.py): will this model fit on these GPUs under this ZeRO stage, how fast
will it train, and how long and how many GPU-hours will the token budget take.

Memory per GPU is DeepSpeed's mixed-precision model-state accounting, split into its parts (bytes
per parameter): 16-bit weights 2, gradients 2 (16-bit) + 4 (fp32), optimizer 4 (fp32 master
weights) + 8 (Adam's two moments). ZeRO-2 shards gradients and optimizer states over the world and
keeps every weight; ZeRO-3 shards the weights too (DeepSpeed counts 18 bytes per parameter there in
all, so its gradients get 4) and gathers one layer at a time (4 bytes per parameter of the largest
layer). Offload moves the optimizer step (and its
states, and the fp32 gradients) to CPU memory, and under ZeRO-3 the weights as well. These totals
equal DeepSpeed's own `estimate_zero2/3_model_states_mem_needs` (tested); the parts and the
activations are what DeepSpeed's estimators do not give.

Activations per layer, per token in 16-bit, after Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", table 2): 34 * hidden bytes when the attention kernel
keeps no score matrix (sdpa's memory-efficient and flash kernels), plus the logits (16-bit, and
fp32 for the loss: 6 bytes per vocabulary entry). Under activation checkpointing each layer keeps
only its 16-bit input (2 * hidden) and one layer's full activations exist at a time. An estimate:
the allocator's fragmentation and the communication buffers come on top (hence HEADROOM).
"""

import math
from dataclasses import dataclass

# Dense (no sparsity) bf16 tensor-core peaks and memory of one GPU, from the vendors' data sheets:
# NVIDIA H100 / H200 (SXM: 989 TFLOPs, "1,979 with sparsity"; H100 PCIe 756), A100 (312; 40 or 80 GB),
# L40S (362), L40 (181), L4 (121), A10 (125), RTX 6000 Ada (364), GeForce RTX 4090 (165, the Ada
# whitepaper's FP16/BF16 with FP32 accumulate: 330 sparse), B200 (2,250, HGX B200's 180 GB per GPU),
# AMD MI300X (1,307, 192 GB). The same peaks as dstrain/train/monitoring.py's PEAK_TFLOPS, which MFU uses
# (a test keeps the two equal; this module does not import that one, to stay light).
GPUS = {
    "B200": (2250.0, 180),
    "H200": (989.0, 141),
    "H100": (989.0, 80),
    "H100-PCIe": (756.0, 80),
    "A100-80GB": (312.0, 80),
    "A100-40GB": (312.0, 40),
    "L40S": (362.0, 48),
    "L40": (181.0, 48),
    "RTX6000Ada": (364.0, 48),
    "A10": (125.0, 24),
    "L4": (121.0, 24),
    "4090": (165.0, 24),
    "MI300X": (1307.0, 192),
}
HEADROOM = 0.9  # of a GPU's memory a plan may count on (CUDA context, allocator fragmentation, buffers)
TOKENS_PER_PARAMETER = 20  # compute-optimal (Hoffmann et al. 2022, "Chinchilla": about 20 tokens per parameter)


@dataclass(frozen=True)
class ModelSize:
    parameters: int  # every parameter once (tied embeddings once)
    largest_layer: int  # the most parameters one module holds itself (ZeRO-3 gathers one at a time)
    layers: int
    hidden: int
    vocab: int
    matmul_parameters: int  # those in a matrix product per token: all but an untied input embedding


def model_size(config) -> ModelSize:
    """Exact counts from the model class itself, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p for p in model.parameters()}.values()
    parameters = sum(p.numel() for p in unique)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    matmul = parameters - (embedding.weight.numel() if output is None or output.weight is not embedding.weight else 0)
    return ModelSize(parameters, largest, config.num_hidden_layers, config.hidden_size, config.vocab_size, matmul)


def model_state_bytes(size: ModelSize, world: int, stage: int, offload: bool) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer states and (ZeRO-3) the gathered layer."""
    n = size.parameters
    # ZeRO-2: 2 (16-bit weights, every one) + 18 sharded; DeepSpeed counts ZeRO-3 at 18 sharded in all, the
    # 16-bit weights included: its gradients' share is then 4, not 2 + 4.
    parts = {"weights": 2 * n if stage == 2 else 2 * n / world, "gradients": (6 if stage == 2 else 4) * n / world,
             "optimizer": 12 * n / world, "gathered layer": 4 * size.largest_layer if stage == 3 else 0}
    if offload:
        parts["gradients"] = parts["optimizer"] = 0  # fp32 gradients and Adam live and step in CPU memory
        if stage == 3:
            parts["weights"] = 0  # ZeRO-3 offload_param: only the layer being computed is on the GPU
    return parts


def deepspeed_estimate(size: ModelSize, world: int, stage: int, offload: bool) -> tuple[int, int]:
    """(CPU bytes, GPU bytes per GPU) from DeepSpeed's own estimators, one node of `world` GPUs (under
    ZeRO-3, offload means the optimizer and the weights, as ds_configs/zero3_offload.json; zero_init on)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(size.parameters, num_gpus_per_node=world, cpu_offload=offload)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(size.parameters, size.largest_layer, num_gpus_per_node=world,
                                                        cpu_offload=offload, cpu_offload_params=offload)
    return cpu, gpu


def deepspeed_cpu_bytes(size: ModelSize, world: int, stage: int) -> int:
    return deepspeed_estimate(size, world, stage, offload=True)[0]


def activation_bytes(size: ModelSize, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    tokens = micro_batch * seq_len
    per_layer = 34 * size.hidden * tokens
    layers = 2 * size.hidden * tokens * size.layers + per_layer if checkpointing else per_layer * size.layers
    return layers + 6 * size.vocab * tokens


def flops_per_token(size: ModelSize, seq_len: int) -> float:
    """6N + 12 * layers * hidden * seq_len (PaLM appendix B), as monitoring's MFU counts it."""
    return 6 * size.matmul_parameters + 12 * size.layers * size.hidden * seq_len


@dataclass
class Plan:
    size: ModelSize
    gpu: str
    world: int
    stage: int
    offload: bool
    memory: dict  # per GPU, bytes, by part
    gpu_bytes: float
    tokens_per_second: float
    tokens: float
    seconds: float
    compute_optimal_tokens: float

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= HEADROOM * self.gpu_bytes

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.world / 3600


def make_plan(size: ModelSize, gpu: str, world: int, stage: int, offload: bool, micro_batch: int, seq_len: int,
              checkpointing: bool, mfu: float, tokens: float | None, gpu_memory_gb: float | None = None) -> Plan:
    peak, memory_gb = GPUS[gpu]
    memory = model_state_bytes(size, world, stage, offload)
    memory["activations"] = activation_bytes(size, micro_batch, seq_len, checkpointing)
    speed = mfu * peak * 1e12 * world / flops_per_token(size, seq_len)
    optimal = TOKENS_PER_PARAMETER * size.parameters
    tokens = tokens or optimal
    return Plan(size, gpu, world, stage, offload, memory, (gpu_memory_gb or memory_gb) * 1e9, speed, tokens,
                tokens / speed, optimal)


def _gib(value: float) -> str:
    return f"{value / 2**30:8.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def describe(plan: Plan, mfu: float, micro_batch: int, seq_len: int, checkpointing: bool) -> str:
    size = plan.size
    zero = f"ZeRO-{plan.stage}" + (" + offload" if plan.offload else "")
    lines = [f"Model: {size.parameters / 1e6:,.1f}M parameters ({size.layers} layers x {size.hidden}, vocab "
             f"{size.vocab:,}); largest layer {size.largest_layer / 1e6:,.1f}M",
             f"Setup: {plan.world} x {plan.gpu} ({GPUS[plan.gpu][0]:g} bf16 TFLOPs dense, "
             f"{plan.gpu_bytes / 1e9:g} GB), {zero}, micro batch {micro_batch} x {seq_len} tokens"
             f"{', activation checkpointing' if checkpointing else ''}",
             "Memory per GPU:"]
    lines += [f"  {part:<15}{_gib(value)}" for part, value in plan.memory.items() if value or part != "gathered layer"]
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'total':<15}{_gib(plan.total_bytes)}  -> {verdict} in {HEADROOM:.0%} of {plan.gpu_bytes / 2**30:.1f} GiB")
    if not plan.fits:
        lines.append("  (try ZeRO-3, offload, a smaller micro batch with more accumulation, or activation checkpointing)")
    if plan.offload:
        lines.append(f"CPU memory per node for the offloaded states (DeepSpeed's estimate, 1 node of {plan.world}): "
                     f"{deepspeed_cpu_bytes(size, plan.world, plan.stage) / 2**30:.1f} GiB")
    lines += [f"Throughput at {mfu:.0%} MFU: {plan.tokens_per_second:,.0f} tokens/s "
              f"({plan.tokens_per_second / plan.world:,.0f} per GPU)",
              f"Tokens: {plan.tokens:,.0f} (compute-optimal for this size: {plan.compute_optimal_tokens:,.0f}, "
              f"about {TOKENS_PER_PARAMETER} per parameter)",
              f"Time: {_duration(plan.seconds)} on {plan.world} GPUs = {plan.gpu_hours:,.1f} GPU-hours"]
    return "\n".join(lines)


def gpu_table() -> str:
    rows = [f"  {name:<12}{tflops:>8g} TFLOPs  {gb:>4} GB" for name, (tflops, gb) in GPUS.items()]
    return "GPUs (dense bf16 peak, memory):\n" + "\n".join(rows)


def steps_for(tokens: float, world: int, micro_batch: int, accumulation: int, seq_len: int) -> int:
    return math.ceil(tokens / (world * micro_batch * accumulation * seq_len))
