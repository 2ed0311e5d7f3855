"""Image-text chat SFT data: conversations whose user turns carry images, checked, tokenized with the
model's chat template and processor, labels on the assistant replies only, images loaded per batch.

Records (read and checked in dstrain/data/image_records.py, through records.read_records, so every input
kind and `file:line` error works as in text SFT):
  content parts  {"messages": [{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                                            {"type": "text", "text": "What is this?"}]}, ...]}
                 (an image part names its file by "path", "image" or "url" with file://; no downloads)
  placeholders   {"messages": [{"role": "user", "content": "<image>\\nWhat is this?"}, ...], "images": ["cat.png"]}
                 (the model's image token, `<image>` for LLaVA, once per image, in order)
ShareGPT records work as the placeholder layout (`conversations` + `images`). Relative image paths are
relative to the data file. A missing or unreadable image, a placeholder count that differs from the
images, or an image in an assistant turn stops the run with one `file:line` line (--skip_bad_records
skips and counts it). Reading checks each image's header only (its size, which sets its token count for
processors whose count varies, e.g. Qwen2-VL); the pixels are decoded by the collator, per batch.

Tokens. Every conversation is rendered with the text template (one image token per image) and masked
exactly as text SFT (dstrain/data/chat_template.py: `{% generation %}` markers or prefix rendering); then
each image token is repeated into the number of tokens the processor gives that image
(`processor._get_num_multimodal_tokens`, the API vLLM uses), with label -100: image tokens are never
trained. This is what the processor itself makes of the same conversation and images (tested), without
decoding an image at build time. A conversation over --max_length is cut after its last assistant reply
that fits, as in text SFT; since images sit in user turns, a cut never splits an image's tokens, and the
images past the cut are left out with their tokens (the data audit checks both).

Packing is refused: LLaVA-style models scatter image features by the image tokens' order in a batch and
build no per-conversation mask for them, and nothing here has been tested with packed image rows.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value

from dstrain.data.cache import ProcessedDatasets, processed_datasets, skipped_records
from dstrain.data.chat_template import IGNORE, tokenize_conversation
from dstrain.data.image_records import read_image_conversations
from dstrain.data.records import ReadStats
from dstrain.data.sft import (
    DROPPED,
    KEPT,
    TRUNCATED,
    ChatSpec,
    _length_reports,
    _token_counts,
    assistant_spans,
    describe,
    fit_to_length,
    fitted_splits,
)
from dstrain.data.token_store import token_dtype
from dstrain.distributed import print0
from dstrain.errors import UserError

# ChatML as the text tokenizers here have it (dstrain/data/tokenizer.py), with image content parts: an image
# part renders as the image token, a text part as its text. Contents may be strings (the placeholder layout)
# or lists of parts (OpenAI-style, what processors' apply_chat_template takes at inference). The image token
# is written as an expression, not template text: `{%-` would eat a newline written after it in the template.
IMAGE_CHATML_TEMPLATE = (
    "{%- macro body(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- body(message['content']) + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- body(message['content']) + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ---------------------------------------------------------------- tokens


def image_token_counts(processor, image_sizes: list) -> list[int]:
    """How many tokens the processor gives each image of these (height, width) sizes."""
    if not image_sizes:
        return []
    return [int(n) for n in processor._get_num_multimodal_tokens(image_sizes=[tuple(s) for s in image_sizes])
            .num_image_tokens]


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int, counts: list[int]):
    """Each image token repeated into its image's token count (label -100), by position, in numpy."""
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    where = np.nonzero(ids == image_token_id)[0]
    if len(where) != len(counts):
        raise UserError(f"the template rendered {len(where)} image tokens for {len(counts)} images")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[where] = counts
    ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
    labels[ids == image_token_id] = IGNORE
    return ids.tolist(), labels.tolist()


def tokenize_image_conversation(tokenizer, processor, messages: list[dict], image_sizes: list):
    """(input_ids, labels, tokens per image) of one conversation, as training sees it."""
    ids, labels = tokenize_conversation(tokenizer, messages)
    counts = image_token_counts(processor, image_sizes)
    ids, labels = expand_image_tokens(ids, labels, processor.image_token_id, counts)
    return ids, labels, counts


def processor_identity(processor) -> str:
    """What sets the image tokens and pixels: the processor's saved settings (part of the cache key)."""
    return processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)


@dataclass(frozen=True)
class ImageChatSpec(ChatSpec):
    """Image-text conversations: text masks as ChatSpec, image tokens expanded per image, never packed."""

    kind = "sft-images"
    layout = "1"

    image_token: str = "<image>"
    processor_settings: str = ""
    processor: object = field(default=None, compare=False)

    def read(self, files, stats: ReadStats):
        yield from read_image_conversations(files, self.image_token, self.data_format, self.system_prompt,
                                            self.skip_bad_records, stats)

    def build(self, tokenizer, records: Dataset, scratch: Path):
        return _tokenize_and_fit_images(self, tokenizer, records)


def image_sft_datasets(data_args, tokenizer, processor, seed: int):
    """Tokenized train and validation datasets of image-text conversations (sft.py, lora.py)."""
    if data_args.packing:
        raise UserError("--packing true is not supported with image-text models (image features are placed by "
                        "the order of image tokens in a batch, with no per-conversation mask); use --packing false")
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise UserError("the model's processor names no image token (processor.image_token)")
    spec = ImageChatSpec.from_arguments(data_args, seed, data_format=data_args.data_format,
                                        system_prompt=data_args.system_prompt, max_length=data_args.max_length,
                                        packing=False, image_token=image_token,
                                        processor_settings=processor_identity(processor), processor=processor)
    data = processed_datasets(spec, tokenizer)
    if (skipped := skipped_records(data.report)) is not None:
        print0(skipped)
    print0(describe(data, spec.max_length, False))
    print0(describe_images(data))
    return data


def _tokenize_and_fit_images(spec: ImageChatSpec, tokenizer, conversations: Dataset):
    fitted = conversations.map(
        _tokenize_batch, batched=True, batch_size=256,
        fn_kwargs={"tokenizer": tokenizer, "processor": spec.processor, "max_length": spec.max_length},
        remove_columns=["messages", "image_sizes"],
        features=Features({"input_ids": Sequence(Value(np.dtype(token_dtype(len(tokenizer))).name)),
                           "labels": Sequence(Value("int32")), "images": Sequence(Value("string")),
                           "image_tokens": Sequence(Value("int32")), "source": Value("string"),
                           "is_validation": Value("bool"), "fit": Value("int8"), "first_reply_end": Value("int32")}),
        desc="Tokenizing image conversations")
    reports = _length_reports(fitted)
    if sum(report["kept"] for report in reports.values()) == 0:
        raise UserError(f"every conversation is longer than --max_length {spec.max_length} before its first reply "
                        "ends (image tokens included); raise --max_length")
    splits = fitted_splits(fitted, spec)
    for name, split in splits.items():
        reports[name] |= _token_counts(split) | _image_counts(split) | {
            "image_token_id": int(spec.processor.image_token_id)}
    return ProcessedDatasets(splits, report={name: reports[name] for name in splits})


def _tokenize_batch(batch: dict, tokenizer, processor, max_length: int) -> dict:
    out = {key: [] for key in ("input_ids", "labels", "images", "image_tokens", "fit", "first_reply_end")}
    for messages, images, sizes in zip(batch["messages"], batch["images"], batch["image_sizes"]):
        ids, labels, counts = tokenize_image_conversation(tokenizer, processor, messages, sizes)
        spans = assistant_spans(labels)
        out["first_reply_end"].append(spans[0][1] if spans else -1)
        fitted = fit_to_length(ids, labels, max_length)
        if fitted is None:
            out["fit"].append(DROPPED)
            ids = labels = []
            images, counts = [], []
        else:
            out["fit"].append(TRUNCATED if len(fitted[0]) < len(ids) else KEPT)
            ids, labels = fitted
            # images whose tokens all lie before the cut (a cut at a reply's end never splits one)
            kept = int(np.searchsorted(np.cumsum(counts), int(np.sum(np.asarray(ids) == processor.image_token_id)),
                                       side="right")) if counts else 0
            images, counts = images[:kept], counts[:kept]
        for key, value in (("input_ids", ids), ("labels", labels), ("images", images), ("image_tokens", counts)):
            out[key].append(value)
    return out | {"source": batch["source"], "is_validation": batch["is_validation"]}


def _image_counts(split: Dataset) -> dict:
    """Images and image tokens of a split, and the fewest and most tokens an image got."""
    images = tokens = 0
    low, high = None, None
    for table in split.select_columns(["image_tokens"]).with_format("arrow").iter(batch_size=10_000):
        counts = table.column("image_tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if len(counts):
            images, tokens = images + len(counts), tokens + int(counts.sum())
            low = int(counts.min()) if low is None else min(low, int(counts.min()))
            high = int(counts.max()) if high is None else max(high, int(counts.max()))
    return {"images": images, "image_tokens": tokens, "tokens_per_image_min": low, "tokens_per_image_max": high}


def describe_images(data) -> str:
    lines = []
    for name in data:
        report = data.report[name]
        per_image = (f", {report['tokens_per_image_min']}-{report['tokens_per_image_max']} tokens per image"
                     if report["images"] else "")
        lines.append(f"Images: {name} {report['images']:,} images, {report['image_tokens']:,} image tokens{per_image}")
    return "\n".join(lines)


# ---------------------------------------------------------------- batches


def load_image(path: str):
    """The image's pixels as RGB, decoded now (per batch, never kept for the whole dataset)."""
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"{path}: cannot read the image ({str(error).splitlines()[0]}); it was readable when "
                        "the data was built (delete the data cache if the images changed)") from None


@dataclass
class ImageChatCollator:
    """A batch of image conversations: ids and labels padded to the batch's longest (labels -100, attention
    mask 0), and the batch's images decoded and run through the processor's image processor, in row order,
    which is the order the model places their features at the image tokens."""

    processor: object
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        longest = max(len(row["input_ids"]) for row in rows)
        gap = [longest - len(row["input_ids"]) for row in rows]
        batch = {
            "input_ids": torch.tensor([list(row["input_ids"]) + [self.pad_token_id] * n for row, n in zip(rows, gap)]),
            "labels": torch.tensor([list(row["labels"]) + [IGNORE] * n for row, n in zip(rows, gap)]),
            "attention_mask": torch.tensor([[1] * len(row["input_ids"]) + [0] * n for row, n in zip(rows, gap)]),
        }
        paths = [path for row in rows for path in row.get("images") or []]
        if paths:
            pixels = self.processor.image_processor([load_image(path) for path in paths], return_tensors="pt")
            batch.update(pixels)
        return batch


def image_collator(processor, tokenizer) -> ImageChatCollator:
    return ImageChatCollator(processor, tokenizer.pad_token_id)
