"""Sequence parallelism (`--sequence_parallel_size N`): each sequence is split across N ranks, and
attention exchanges heads for sequence by all-to-all (DeepSpeed Ulysses); data parallel over the rest.

The libraries do the work: accelerate's `ParallelismConfig(sp_backend="deepspeed")` (built from the flag
in `TrainingArguments`) makes HF's Trainer register DeepSpeed's `UlyssesSPAttentionHF` in place of the
model's attention kernel and wrap the training DataLoader in `UlyssesSPDataLoaderAdapter`, which hands
every rank of an SP group its slice of the same batch. What is here is what they lack (transformers
5.23, accelerate 1.15, DeepSpeed 0.19.8), each checked on 2 CPU ranks against a 1-rank run:
- the checks that give one line instead of an assertion deep in a forward pass (world size, heads,
  sequence length, attention kernel, chat data, ZeRO-3 without reduce-scatter);
- `position_ids` in every batch, which the adapter requires and our pretraining collator has no
  other reason to make;
- `packed_sdpa`: packed rows' block-causal mask, which Ulysses drops, rebuilt after the all-to-all;
- `SequenceParallelTrainer`: contiguous batches and the gradient scale of transformers' SP loss
  (`gradient_share`), and skipping micro-batches on a mid-epoch resume (`skip_micro_batches`).
"""

import torch
from transformers import Trainer

from dstrain.errors import UserError

# Kernels Ulysses can wrap and that keep a batch's meaning: sdpa (causal over the whole row) and the
# flash kernels (which also keep packed documents apart through the position_ids; GPU only).
WRAPPABLE = ("sdpa", "flash_attention_2", "flash_attention_3")


def parallelism_config(size: int):
    """accelerate's configuration for Ulysses over `size` ranks; the kernel is set from the model later
    (`prepare_model`), once it is known. Sequence lengths may vary between batches (packed SFT rows)."""
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    return ParallelismConfig(sp_size=size, sp_backend="deepspeed",
                             sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True,
                                                                        sp_attn_implementation="sdpa"))


def check_sizes(size: int, world_size: int, deepspeed) -> None:
    """The flag against the launch: checked while the arguments are built."""
    if size < 1:
        raise UserError(f"--sequence_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    if not deepspeed:
        raise UserError("--sequence_parallel_size needs DeepSpeed (--deepspeed ds_configs/zero2.json or zero3.json): "
                        "its Ulysses attention does the sequence split")
    if world_size % size:
        raise UserError(f"--sequence_parallel_size {size} does not divide the world size {world_size}: launch a "
                        "multiple of it (the ranks left over form the data-parallel groups)")


def check_model(model, size: int, where: str = "the model") -> str:
    """Refuse a model Ulysses cannot split; return its attention kernel."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    kernel = getattr(base.config, "_attn_implementation", None)
    if not getattr(base, "_supports_attention_backend", False):
        raise UserError(f"--sequence_parallel_size: {where} ({type(base).__name__}) does not call its attention "
                        "through transformers' attention interface, which DeepSpeed Ulysses wraps")
    if kernel not in WRAPPABLE:
        raise UserError(f"--sequence_parallel_size: attention '{kernel}' cannot be split across ranks (it needs the "
                        f"full O(n^2) mask); use --attn_implementation {' or '.join(WRAPPABLE[:2])}")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or heads % size:
        raise UserError(f"--sequence_parallel_size {size} does not divide the {heads} attention heads of {where}")
    if kv_heads % size and size % kv_heads:
        raise UserError(f"--sequence_parallel_size {size} and the {kv_heads} key/value heads of {where}: one must "
                        "divide the other")
    return kernel


def check_sequence_length(length: int, size: int, flag: str) -> None:
    if size > 1 and length % size:
        raise UserError(f"{flag} {length} is not divisible by --sequence_parallel_size {size}: each rank takes an "
                        "equal slice of every sequence")


def check_chat_rows(size: int, packing: bool, max_length: int) -> None:
    """Chat data under Ulysses: packed rows (each conversation marked by restarting position_ids, which
    is what lets attention keep them apart after the all-to-all: `packed_sdpa`), and a --max_length the
    split divides (rows are padded to a multiple of the size, and must stay within it)."""
    if size <= 1:
        return
    if not packing:
        raise UserError("--sequence_parallel_size with chat data needs --packing (rows carrying each "
                        "conversation's position_ids, which keep conversations apart once a row is split)")
    check_sequence_length(max_length, size, "--max_length")


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' sdpa attention, with the mask of packed rows rebuilt from the position_ids.

    Ulysses drops the attention mask (it was built for one rank's slice) and, for sdpa, attends causally
    over the whole row, so conversations packed into one row would see each other. After the all-to-all
    it passes the whole row's position_ids; where they restart, this builds the block-causal mask that
    transformers builds without SP (`find_packed_sequence_indices`: a new segment wherever a position is
    not its predecessor + 1). The mask costs O(length^2) memory per row: on GPUs flash attention keeps
    packed conversations apart from the position_ids alone, without one. Rows that do not restart
    (pretraining blocks) keep sdpa's causal kernel and no mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import find_packed_sequence_indices

    if attention_mask is None and position_ids is not None and position_ids.shape[-1] == query.shape[-2]:
        segments = find_packed_sequence_indices(position_ids)
        if segments is not None:
            length = segments.shape[-1]
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            attention_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)


def prepare_model(args, model) -> None:
    """Point accelerate at the model's own attention kernel (DeepSpeed refuses a mismatch); check the
    model and the ZeRO configuration."""
    kernel = check_model(model, args.sequence_parallel_size)
    args.parallelism_config.sp_handler.sp_attn_implementation = kernel
    if kernel == "sdpa":  # Ulysses wraps whatever is registered under the name when the Trainer prepares the model
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS["sdpa"] = packed_sdpa
    deepspeed = getattr(args, "hf_deepspeed_config", None)
    if deepspeed is not None:  # refuse a ZeRO set-up of unknown gradient scale now, not at the first step
        gradient_share(deepspeed.config.get("zero_optimization", {}), args.sequence_parallel_size)


class WithPositionIds:
    """A collator whose batches also carry `position_ids` (0..n-1 per row) when it made none: the
    Ulysses adapter slices every tensor of the batch, and attention needs each token's global position
    after the all-to-all. Packed rows keep their own restarting position_ids."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator(rows)
        if "position_ids" not in batch:
            ids = batch["input_ids"]
            batch["position_ids"] = torch.arange(ids.shape[1], dtype=torch.long).expand(ids.shape[0], -1)
        return batch


def skip_micro_batches(dataloader, count: int):
    """Resuming inside an epoch under Ulysses: skip `count` micro-batches of the adapter.

    HF's Trainer calls accelerate's `skip_first_batches` on the training DataLoader, which under SP is
    DeepSpeed's adapter, and it fails there (it has no `.dataset`). Each batch the wrapped DataLoader gives
    a rank becomes sp_size micro-batches (every SP rank's batch, in turn), so skip count // sp_size batches
    underneath and drop the remainder from the adapter's queue (every rank does the same, so the
    collectives a refill makes stay matched)."""
    from accelerate import skip_first_batches
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    if not isinstance(dataloader, UlyssesSPDataLoaderAdapter):
        return skip_first_batches(dataloader, count)
    dataloader.dl = skip_first_batches(dataloader.dl, count // dataloader.sp_world_size)
    dataloader.iter = iter(dataloader.dl)
    dataloader.micro_batches.clear()
    for _ in range(count % dataloader.sp_world_size):
        next(dataloader)
    return dataloader


def install_resume_skip() -> None:
    """Make transformers' Trainer skip with `skip_micro_batches` (it calls the name it imported from
    accelerate, and delegates to it for every other DataLoader)."""
    import transformers.trainer

    transformers.trainer.skip_first_batches = skip_micro_batches


def gradient_share(zero: dict, size: int) -> float:
    """The share of the gradient of transformers' SP loss that gives the true gradient after DeepSpeed's
    reduction, for this ZeRO configuration (see SequenceParallelTrainer). DeepSpeed 0.19.8 divides the
    summed gradients by the data-parallel size only (it expects each SP rank's gradient to be a partial
    of the full one) in ZeRO-0/1/2 and in ZeRO-3's contiguous-buffer path, but by the whole SP x DP group
    in ZeRO-3's reduce-scatter path (its default), which cancels the surplus."""
    stage = int(zero.get("stage", 0))
    if stage < 3:
        return 1.0 / size
    if zero.get("reduce_scatter", True):
        return 1.0
    # Without reduce_scatter ZeRO-3 picks a path per bucket by its size: the two scales would mix.
    raise UserError("--sequence_parallel_size with ZeRO-3 needs \"reduce_scatter\": true in the DeepSpeed config "
                    "(its default): without it DeepSpeed scales the gradients of some buckets differently")


class SequenceParallelTrainer(Trainer):
    """HF's Trainer with two fixes to its Ulysses loss (`deepspeed_sp_compute_loss` in transformers 5.23):

    - the adapter's slices are views (`batch[k][:, a:b].cpu()`, a no-op copy on CPU): the loss's
      `shift_labels.view(-1)` then fails ("view size is not compatible"); contiguous copies fix it;
    - the gradient scale. The SP loss is gathered with an autograd all-gather whose backward sums the
      gradient of every SP rank's (identical) total loss, so each rank's shard receives sp_size times its
      share. Under ZeRO-1/2 DeepSpeed then sums the shards over the SP group and divides by the
      data-parallel size only, and the gradients come out sp_size times too large: AdamW hides most of
      it, but clipping acts at max_grad_norm / sp_size and every logged grad norm is sp_size times the
      true one. ZeRO-3's reduce-scatter averages over the whole group and cancels it (`gradient_share`).
      The returned loss keeps its value (the logged loss is unchanged) and carries the right share of
      the gradient. Upstream, transformers' loss and DeepSpeed's ZeRO-3 reduce-scatter would have to
      change together (each is right only for the other's convention).
    """

    share = None  # of the gradient, once the DeepSpeed config is final (at the first step)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_resume_skip()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            inputs = {key: value.contiguous() if torch.is_tensor(value) else value for key, value in inputs.items()}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        if self.share is None:
            self.share = gradient_share(self.accelerator.deepspeed_config.get("zero_optimization", {}),
                                        self.args.sequence_parallel_size)
        loss, outputs = result if return_outputs else (result, None)
        if self.share != 1.0:
            loss = loss * self.share + loss.detach() * (1.0 - self.share)  # value: the loss; gradient: its share
        return (loss, outputs) if return_outputs else loss
