"""`--tiled_mlp` and `--tiled_loss`: ALST's tiled compute (Arctic Long Sequence Training, DeepSpeed
0.19.8's `deepspeed.runtime.sequence_parallel.ulysses_sp.sequence_tiled_compute`) for long sequences.

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

The tiled loss (`tile_loss`) is the same idea for the head: the logits of a whole sequence (vocabulary x
tokens, in fp32 for the loss) are often the largest tensor of a step; tiled, each shard's logits are made,
scored and dropped, and made again in backward. transformers has no hook between its causal-LM head and
the loss, so the causal LM's `forward` is replaced (per instance, training with labels only) by the few
lines it runs: the decoder, then the head and transformers' causal-LM loss (shifted labels, or the
`shift_labels` Ulysses passes; -100 ignored; divided by `num_items_in_batch` when the Trainer gives it)
in shards. Why not DeepSpeed's `TiledFusedLogitsLoss`: it runs backward inside forward with an incoming
gradient of 1, and later scales only the hidden states' gradient, so the head's weight gradient ignores
whatever the loss is multiplied by afterwards (gradient accumulation, the sequence-parallel share);
`sequence_tiled_compute` recomputes in backward with the real incoming gradient.
"""

import math

import torch

from dstrain.errors import UserError

IGNORE = -100
LOGITS_TILE_BYTES = 2**28  # fp32 logits per loss shard: 256 MiB


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


def loss_shards_for(longest_row: int, sequence_parallel_size: int, vocab_size: int) -> int:
    """Enough shards that one shard's fp32 logits stay under LOGITS_TILE_BYTES; at least 2."""
    local = math.ceil(longest_row / max(sequence_parallel_size, 1))
    return max(2, math.ceil(local * vocab_size * 4 / LOGITS_TILE_BYTES))


def tile_loss(model, shards: int) -> None:
    """Make `model` (a causal LM, or PEFT's wrapper of one) compute its training loss in `shards` tiles."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute
    from transformers.modeling_outputs import CausalLMOutputWithPast

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    if decoder is None or head is None or not type(causal).__name__.endswith("ForCausalLM"):
        raise UserError(f"--tiled_loss: {type(causal).__name__} is not a causal LM with a decoder and an output head; "
                        "leave the flag out for this model")
    untiled = causal.forward
    vocab_size = causal.config.get_text_config().vocab_size
    # A head tied to the input embeddings gets two gradients in one backward: the shards' (inside this
    # function's backward) and the embedding's (last of all). DeepSpeed reduces a parameter when its
    # `ds_grad_is_ready` gradient lands; sequence_tiled_compute sets that at the last shard, which under a
    # tied head reduced the shards' part alone (ZeRO-3 then got another gradient for it: the 2-rank run's grad
    # norms were wrong). So a tied head's flag stays down through every shard and goes up once the shards'
    # backward is done (the hook on `hidden`), and the embedding's gradient lands on the sum.
    own = [param for param in head.parameters() if param.requires_grad]
    embeddings = causal.get_input_embeddings()
    tied = any(param is embedding for param in own for embedding in embeddings.parameters())

    def hold_tied_gradient(hidden):
        for param in own:
            param.ds_grad_is_ready = False

        def release(grad):
            for param in own:
                param.ds_grad_is_ready = True
            return grad

        hidden.register_hook(release)

    def shard_loss(hidden, labels):
        logits = head(hidden).float()
        return torch.nn.functional.cross_entropy(logits.view(-1, vocab_size), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        every_logit = isinstance(logits_to_keep, int) and logits_to_keep == 0  # else: asked for some logits
        if labels is None or not causal.training or not torch.is_grad_enabled() or not every_logit:
            return untiled(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                           use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs).last_hidden_state
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:  # as transformers' ForCausalLMLoss: token t is scored on predicting t + 1
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
        if tied and hidden.requires_grad:
            hold_tied_gradient(hidden)
        total = sequence_tiled_compute(shard_loss, hidden.shape[1], shards,
                                       {"hidden": hidden, "labels": shift_labels.to(hidden.device)}, {},
                                       grad_requiring_tensor_key="hidden", compute_params=[] if tied else own,
                                       output_unshard_dimension=0, output_reduction="sum")
        items = kwargs.get("num_items_in_batch")
        if items is None:  # the mean over the scored tokens (none scored: 0, where transformers gives nan)
            items = (shift_labels != IGNORE).sum().clamp(min=1)
        return CausalLMOutputWithPast(loss=total / torch.as_tensor(items, device=total.device))

    causal.forward = forward


def apply(args, model, longest_row: int) -> None:
    """--tiled_mlp and --tiled_loss for this run: shard counts from the flag or the longest row, announced."""
    from dstrain.distributed import print0

    from dstrain.model.image_text import is_image_text

    if is_image_text(model.config):  # its vision tower's MLPs would be cut by the text's shard count
        raise UserError("--tiled_mlp/--tiled_loss: image-text models are not supported; train them untiled")
    config = model.config.get_text_config()
    local = math.ceil(longest_row / max(args.sequence_parallel_size, 1))
    if args.tiled_mlp:
        shards = args.tiled_mlp_shards or shards_for(longest_row, args.sequence_parallel_size, config.hidden_size)
        blocks = tile_mlps(model, shards)
        print0(f"--tiled_mlp: {blocks} MLP blocks in {shards} shards of up to {math.ceil(local / shards)} tokens")
    if args.tiled_loss:
        shards = loss_shards_for(longest_row, args.sequence_parallel_size, config.vocab_size)
        tile_loss(model, shards)
        print0(f"--tiled_loss: the logits and loss in {shards} shards of up to {math.ceil(local / shards)} tokens")
