"""`--tiled_mlp`: ALST's tiled MLP (Arctic Long Sequence Training, DeepSpeed 0.19.8's
`deepspeed.runtime.sequence_parallel.ulysses_sp.sequence_tiled_compute`) for long sequences.

An MLP block is token-wise, and at long sequence lengths its intermediate activations (gate, up, their
product: 3 x intermediate_size per token, kept for backward) are the largest tensors of a layer. Tiled,
the block runs over the sequence in shards without keeping them (forward under no_grad) and recomputes
each shard in backward: activation memory of one shard instead of the whole sequence, for one more MLP
forward per step. DeepSpeed ships the autograd function; transformers does not wire it into its models
(its ALST guide: "TiledMLP ... aren't available in Transformers"), so this replaces the `forward` of each
MLP instance of the model (`*MLP` classes: Llama, Mistral, Qwen2, ...), as ArcticTraining patches
`LlamaMLP.forward`, without touching the class or any other model in the process.

Why `sequence_tiled_compute` with a fixed number of shards rather than `TiledMLP` with one per call:
under ZeRO-3 every call of a projection gathers its weights in a collective, so every rank must make the
same number of calls. `TiledMLP` cuts with `torch.chunk`, whose piece count depends on the length, and
ArcticTraining agrees on it with an all-reduce in every layer of every forward (a host-device sync per
layer). Here the count is fixed for the run from its longest row (`shards_for`), and
`sequence_tiled_compute` always makes exactly that many calls (shorter rows get smaller, possibly empty,
tiles), so ranks agree without any collective.
"""

import math

from dstrain.errors import UserError


def shards_for(longest_row: int, sequence_parallel_size: int, hidden_size: int) -> int:
    """ALST's rule: tiles of about hidden_size tokens of a rank's slice of the longest row (each tile's
    intermediate activations then weigh about as much as the MLP's weights); at least 2, or there is no
    tiling."""
    local = math.ceil(longest_row / max(sequence_parallel_size, 1))
    return max(2, math.ceil(local / hidden_size))


def mlp_modules(model) -> list:
    """Each layer's MLP block (HF names them `<Arch>MLP`; under PEFT the LoRA layers sit inside them)."""
    return [module for _, module in model.named_modules() if type(module).__name__.endswith("MLP")]


def tile_mlps(model, shards: int) -> int:
    """Make every MLP block of `model` compute in `shards` tiles along the sequence; returns how many."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

    blocks = mlp_modules(model)
    if not blocks:
        raise UserError(f"--tiled_mlp: {type(model).__name__} has no MLP blocks to tile (transformers' '<Arch>MLP' "
                        "modules, as in Llama, Mistral or Qwen2); leave the flag out for this model")
    for block in blocks:
        untiled = block.forward
        params = list(block.parameters())  # the ones that require grad get it once per step, after the last tile

        def tiled(x, untiled=untiled, params=params):
            if x.dim() != 3:  # [batch, sequence, hidden]; anything else runs as it was
                return untiled(x)
            return sequence_tiled_compute(lambda x: untiled(x), x.shape[1], shards, {"x": x}, {},
                                          grad_requiring_tensor_key="x", compute_params=params,
                                          output_unshard_dimension=1, output_reduction=None)

        block.forward = tiled
    return len(blocks)


def apply(args, model, longest_row: int) -> None:
    """--tiled_mlp for this run: the shard count from the flag or the longest row, announced once."""
    from dstrain.distributed import print0

    config = model.config.get_text_config()
    shards = args.tiled_mlp_shards or shards_for(longest_row, args.sequence_parallel_size, config.hidden_size)
    blocks = tile_mlps(model, shards)
    local = math.ceil(longest_row / max(args.sequence_parallel_size, 1))
    print0(f"--tiled_mlp: {blocks} MLP blocks in {shards} shards of up to {math.ceil(local / shards)} tokens")
