"""Pretraining data: documents tokenized into stores, planned into splits, cut into fixed blocks.

Every input is tokenized once into its own store (dstrain/data/token_store.py: the ids, each
document followed by eos, 2 bytes a token below 65,536 ids), cached by its content and the
tokenizer, so changing the block size, the mixture, the validation share or the seed re-plans in
seconds and never re-tokenizes. A plan lists, per split, which documents come in which order; a
block is `block_size` consecutive tokens of that stream, read from the stores when the Trainer asks
for it. Only the stream's last tokens, fewer than a block, are left out of each split.

The validation split is drawn per document before packing (no document feeds both sides), and stops
growing at --max_validation_tokens: later draws train. Mixtures (`--train_files web/:0.7 code/:0.3`)
weigh sources by tokens: a source is repeated or sampled down, by the seed, to its share of the
training tokens, and the plan's documents are shuffled so the blocks mix the sources. The build
report holds each split's documents, tokens and length histogram, and each source's planned and
achieved share, for the data audit.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dstrain.data.cache import (
    DataSpec,
    ProcessedDatasets,
    cache_key,
    has_weight,
    length_histogram,
    processed_datasets,
    record_filter,
    tokenizer_identity,
    validation_draws,
)
from dstrain.data.records import expand_inputs, input_fingerprint, iter_texts
from dstrain.data.token_store import TokenStore, build_store, input_bytes, token_dtype
from dstrain.distributed import build_once, is_main_process, print0
from dstrain.errors import UserError

STORES = "stores"  # under --data_cache_dir: one folder per tokenized input, shared by every plan


@dataclass(frozen=True)
class BlockSpec(DataSpec):
    """Pretraining data: documents joined with eos and cut into blocks of `block_size` tokens."""

    kind = "pretrain"
    layout = "4"  # 4: token stores + plans (3 was blocks written per 1,000 documents)

    text_field: str = "text"
    block_size: int = 2048
    weights: tuple = ()  # per train input: its source's weight, or () for no mixture
    sources: tuple = ()  # per train input: the pattern (source) it came from

    @classmethod
    def from_arguments(cls, data_args, seed: int, **settings) -> "BlockSpec":
        sources, weights, train = [], [], []
        where = {"dataset_config": data_args.dataset_config, "dataset_split": data_args.dataset_split}
        patterns = [split_weight(pattern) for pattern in data_args.train_files]
        if any(weight is not None for _, weight in patterns) and any(weight is None for _, weight in patterns):
            raise UserError("--train_files: give every source a weight (path:0.7) or none")
        for pattern, weight in patterns:
            for item in expand_inputs([pattern], "--train_files", **where):
                if item not in train:
                    train.append(item)
                    sources.append(pattern)
                    weights.append(weight)
        validation = (expand_inputs(data_args.validation_files, "--validation_files", **where)
                      if data_args.validation_files else [])
        mixture = tuple(weights) if weights and weights[0] is not None else ()
        return cls(tuple(train), tuple(validation), 0.0 if validation else data_args.validation_split_percentage,
                   data_args.max_validation_tokens, data_args.skip_bad_records, seed, data_args.data_cache_dir,
                   data_args.preprocessing_num_workers, record_filter(data_args), weights=mixture,
                   sources=tuple(sources) if mixture else (), **settings)

    # ---- the stores: each input tokenized once ----
    def store_folder(self, item, tokenizer) -> Path:
        identity = {"input": input_fingerprint(item), "text_field": self.text_field,
                    "skip_bad_records": self.skip_bad_records, "tokenizer": tokenizer_identity(tokenizer),
                    "layout": self.layout}
        return Path(self.cache_dir).expanduser() / STORES / cache_key(identity)

    def stores(self, tokenizer) -> list[TokenStore]:
        """Every input's store (train inputs, then validation inputs), built where missing."""
        found = []
        for item in (*self.train_files, *self.validation_files):
            folder = self.store_folder(item, tokenizer)
            if not folder.exists():
                check_room(folder.parent, input_bytes(item) * np.dtype(token_dtype(len(tokenizer))).itemsize // 2)
            build_once(folder, lambda staging, item=item: build_store(
                item, tokenizer, self.text_field, self.skip_bad_records, self.workers, staging, is_main_process()),
                f"tokenizing {item}")
            found.append(TokenStore(folder))
        return found

    def make(self, tokenizer, folder: Path) -> None:
        stores = self.stores(tokenizer)
        folder.mkdir(parents=True)
        plans, report = make_plans(self, stores, self.uncontaminated if self.record_filter is not None else None)
        if self.record_filter is not None:
            report["contamination"] = self.record_filter.report()
        for name, plan in plans.items():
            for array in PLAN_ARRAYS:
                np.save(folder / f"{name}.{array}.npy", plan[array])
        (folder / "stores.json").write_text(json.dumps([str(store.folder) for store in stores]))
        (folder / "build_report.json").write_text(json.dumps(report))

    def load(self, folder: Path) -> ProcessedDatasets:
        stores = [TokenStore(Path(path)) for path in json.loads((folder / "stores.json").read_text())]
        report = json.loads((folder / "build_report.json").read_text())
        # Memory-mapped: a plan holds 20 bytes a document, too many to copy into every rank at scale.
        splits = {name: PackedBlocks(stores, {array: np.load(folder / f"{name}.{array}.npy", mmap_mode="r")
                                              for array in PLAN_ARRAYS}, self.block_size, name)
                  for name in ("train", "validation") if (folder / f"{name}.starts.npy").exists()}
        return ProcessedDatasets(splits, report)


    def uncontaminated(self, index: int, store: TokenStore, marks: np.ndarray) -> np.ndarray:
        """Which documents of input `index` the contamination check keeps (all but those overlapping a
        benchmark, with --decontaminate true), each checked as the split `marks` puts it in. The stores
        hold ids, not text, so the texts are read again, in the order the stores hold them: the stores
        stay the same with or without the check, and changing the benchmarks never tokenizes again."""
        keep = np.ones(store.documents, dtype=bool)
        texts = iter_texts([(*self.train_files, *self.validation_files)[index]], self.text_field,
                           self.skip_bad_records, with_sources=True)
        for document, (text, where) in enumerate(texts):
            keep[document] = self.record_filter.keep({"text": text, "source": where}, bool(marks[document]))
        return keep


def split_weight(pattern: str) -> tuple[str, float | None]:
    """"web/:0.7" -> ("web/", 0.7); a pattern without a trailing :number has no weight."""
    if not has_weight(pattern):
        return pattern, None
    head, _, tail = pattern.rpartition(":")
    weight = float(tail)
    if weight <= 0:
        raise UserError(f"--train_files {pattern}: a source's weight must be positive")
    return head, weight


def check_room(folder: Path, needed: int) -> None:
    """Refuse a build that cannot fit: about 2 bytes of text a token, 2 or 4 bytes a stored token."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < 1.1 * needed:
        raise UserError(f"--data_cache_dir {folder.parent}: {free / 2**30:.2f} GiB free, but tokenizing the corpus "
                        f"needs about {1.1 * needed / 2**30:.2f} GiB; free some space or choose another --data_cache_dir")


# ---------------------------------------------------------------- plans


PLAN_ARRAYS = ("store", "document", "starts")


def make_plans(spec: BlockSpec, stores: list[TokenStore], keep=None) -> tuple[dict, dict]:
    """Per split, the documents in order, as arrays: `store` (which store), `document` (which of its
    documents) and `starts` (each one's first token in the split's stream, and the stream's end);
    and the build report. `keep(index, store, marks)`, when given, says which documents of an input stay
    (the contamination check), each checked as held out or not as `marks` says."""
    train_count = len(spec.train_files)
    lengths = [store.lengths() for store in stores]
    if spec.validation_files:
        marks = [np.zeros(store.documents, dtype=bool) for store in stores[:train_count]]
    else:
        counts = [store.documents for store in stores[:train_count]]
        marks = np.split(validation_draws(sum(counts), spec.validation_percentage, spec.seed), np.cumsum(counts)[:-1])
    marks += [np.ones(store.documents, dtype=bool) for store in stores[train_count:]]
    kept = [keep(i, store, mark) if keep else np.ones(store.documents, dtype=bool)
            for i, (store, mark) in enumerate(zip(stores, marks))]
    if spec.validation_files:
        train = [(i, np.nonzero(kept[i])[0]) for i in range(train_count)]
        validation = _capped([(i, np.nonzero(kept[i])[0]) for i in range(train_count, len(stores))], lengths,
                             spec.max_validation_tokens)
    else:
        validation = _capped([(i, np.nonzero(mark & kept[i])[0]) for i, mark in enumerate(marks)], lengths,
                             spec.max_validation_tokens)
        train = [(i, np.setdiff1d(np.nonzero(kept[i])[0], held)) for i, held in validation]
    mixture = _mixture(spec, train, lengths) if spec.weights else None
    if mixture is not None:
        train = mixture["parts"]
    plans, report = {}, {}
    for name, parts in (("train", train), ("validation", validation)):
        if name == "validation" and not spec.holds_out:
            continue
        store = np.concatenate([np.full(len(documents), i, dtype=np.int32) for i, documents in parts])
        documents = np.concatenate([documents.astype(np.int64) for _, documents in parts])
        sizes = np.concatenate([lengths[i][documents_] for i, documents_ in parts])
        if mixture is not None and name == "train":  # so that blocks mix the sources
            order = np.random.default_rng(spec.seed).permutation(len(documents))
            store, documents, sizes = store[order], documents[order], sizes[order]
        if int(sizes.sum()) < spec.block_size:
            hint = ("lower --block_size or add data" if name == "train"
                    else "raise --validation_split_percentage, give --validation_files, or lower --block_size")
            raise UserError(f"the {name} split holds {int(sizes.sum())} tokens, fewer than one block of "
                            f"{spec.block_size}: {hint}")
        plans[name] = {"store": store, "document": documents, "starts": np.concatenate([[0], np.cumsum(sizes)])}
        report[name] = {"documents": len(documents), "tokens": int(sizes.sum()),
                        "length_histogram": length_histogram(sizes)}
        if name == "train" and mixture is not None:
            report[name]["sources"] = mixture["report"] | {"achieved": _achieved(spec, store, sizes)}
    return plans, report


def _capped(parts: list, lengths: list[np.ndarray], cap: int) -> list:
    """The validation documents, in draw order, until `cap` tokens (0: no cap); the rest train."""
    kept, total = [], 0
    for i, documents in parts:
        running = total + np.cumsum(lengths[i][documents])
        take = len(documents) if not cap else int(np.searchsorted(running, cap, side="right"))
        kept.append((i, documents[:take]))
        total = int(running[take - 1]) if take else total
    return kept


def _mixture(spec: BlockSpec, train: list, lengths: list[np.ndarray]) -> dict:
    """Each source repeated or sampled down (by the seed) to its weight's share of the training tokens."""
    names = list(dict.fromkeys(spec.sources))
    weights = np.array([spec.weights[spec.sources.index(name)] for name in names], dtype=np.float64)
    weights /= weights.sum()
    by_source = [[(i, documents) for i, documents in train if spec.sources[i] == name] for name in names]
    available = np.array([sum(int(lengths[i][documents].sum()) for i, documents in parts) for parts in by_source],
                         dtype=np.float64)
    rng, planned = np.random.default_rng(spec.seed), []
    for parts, weight, tokens in zip(by_source, weights, available):
        target, taken = weight * available.sum(), 0.0
        while tokens and taken + tokens <= target:  # whole epochs
            planned += parts
            taken += tokens
        if tokens and taken < target:  # then a seeded sample of documents for the rest
            store = np.concatenate([np.full(len(d), i, dtype=np.int32) for i, d in parts])
            documents = np.concatenate([d for _, d in parts])
            sizes = np.concatenate([lengths[i][d] for i, d in parts])
            order = rng.permutation(len(documents))
            take = int(np.searchsorted(np.cumsum(sizes[order]), target - taken, side="left")) + 1
            chosen = order[:take]
            planned += [(i, np.sort(documents[chosen][store[chosen] == i])) for i, _ in parts]
    return {"parts": planned, "report": {"names": names, "weights": [float(w) for w in weights],
                                         "available_tokens": [int(t) for t in available]}}


def _achieved(spec: BlockSpec, store: np.ndarray, sizes: np.ndarray) -> list[float]:
    """Each source's share of the planned training tokens."""
    names = list(dict.fromkeys(spec.sources))
    source_of_store = np.array([names.index(source) for source in spec.sources])
    per_source = np.bincount(source_of_store[store], weights=sizes, minlength=len(names))
    return [float(share) for share in per_source / per_source.sum()]


# ---------------------------------------------------------------- the blocks training reads


class PackedBlocks(torch.utils.data.Dataset):
    """Block i: tokens [i * block_size, (i + 1) * block_size) of the split's document stream, read from
    the stores (a few slices of memory-mapped files). Items are {"input_ids": int64 array}; labels
    and the attention mask are the collator's (block_collator)."""

    def __init__(self, stores: list[TokenStore], plan, block_size: int, name: str):
        self.stores, self.block_size, self.name = stores, block_size, name
        self.store, self.document, self.starts = plan["store"], plan["document"], plan["starts"]

    def __len__(self) -> int:
        return int(self.starts[-1]) // self.block_size

    def pieces(self, index: int) -> list[tuple[int, int, int, int]]:
        """(plan position, store, first token, last token + 1) of each document piece in block `index`."""
        low, high = index * self.block_size, (index + 1) * self.block_size
        first = int(np.searchsorted(self.starts, low, side="right")) - 1
        last = int(np.searchsorted(self.starts, high, side="left")) - 1
        found = []
        for position in range(first, last + 1):
            store, document = int(self.store[position]), int(self.document[position])
            begin = int(self.stores[store].offsets[document])
            start, end = max(low, int(self.starts[position])), min(high, int(self.starts[position + 1]))
            found.append((position, store, begin + start - int(self.starts[position]),
                          begin + end - int(self.starts[position])))
        return found

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        ids = np.concatenate([self.stores[store].tokens[start:end] for _, store, start, end in self.pieces(index)])
        return {"input_ids": ids.astype(np.int64)}

    def place(self, position: int) -> str:
        """Where the plan's document at `position` came from ("file:line")."""
        return self.stores[int(self.store[position])].place(int(self.document[position]))

    def block_places(self, index: int) -> list[str]:
        return [self.place(position) for position, *_ in self.pieces(index)]


def block_collator(rows: list[dict]) -> dict:
    """A batch of blocks: the ids, and the same ids as labels (the model shifts them itself). No
    attention mask: every position is a real token."""
    input_ids = torch.from_numpy(np.stack([row["input_ids"] for row in rows]))
    return {"input_ids": input_ids, "labels": input_ids}


@dataclass(frozen=True)
class DocumentBlocksCollator:
    """--document_mask: blocks whose documents never attend to each other. Each document in the stream
    ends with eos, so a document starts at a block's first token or after an eos; position_ids restart
    there, and transformers then masks attention per document (as for packed SFT rows: sdpa and eager
    build the block-diagonal mask from the restarting positions when no KV cache is made, flash's
    varlen kernels take the boundaries from them in a batch flattened to one row). A document's first
    token is not a target (its label is -100: nothing before it in its own document predicts it), so
    a block's loss is its documents' losses, each computed alone, weighted by their tokens."""

    eos_token_id: int
    flatten: bool = False  # flash attention: one padding-free row per batch

    def __call__(self, rows: list[dict]) -> dict:
        input_ids = torch.from_numpy(np.stack([row["input_ids"] for row in rows]))
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = input_ids[:, :-1] == self.eos_token_id
        index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        position_ids = index - torch.where(starts, index, 0).cummax(dim=-1).values
        labels = input_ids.masked_fill(starts, -100)  # a block's first token too: flattened, the previous block's last would predict it
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.flatten:
            batch = {key: value.reshape(1, -1) for key, value in batch.items()}
        batch["use_cache"] = False  # with a KV cache transformers would not derive the per-document mask
        return batch


def pretraining_collator(document_mask: bool, tokenizer, attn_implementation: str | None):
    """block_collator, or with --document_mask the per-document one (flattened under flash attention)."""
    if not document_mask:
        return block_collator
    return DocumentBlocksCollator(tokenizer.eos_token_id, flatten="flash" in (attn_implementation or ""))


def pretraining_datasets(data_args, tokenizer, block_size: int, seed: int) -> ProcessedDatasets:
    """Train (and, if any, validation) blocks: PackedBlocks datasets over the token stores."""
    spec = BlockSpec.from_arguments(data_args, seed, text_field=data_args.text_field, block_size=block_size)
    packed = processed_datasets(spec, tokenizer)
    for store in next(iter(packed.values())).stores:  # printed by every run, built or reused
        if store.meta["skipped"]:
            print0(f"Skipped {store.meta['skipped']} bad records of {store.meta['input']} (--skip_bad_records); "
                   f"first: {store.meta['problems'][0]}")
    print0(_describe(packed, block_size))
    return packed


def _describe(packed: ProcessedDatasets, block_size: int) -> str:
    sizes = ", ".join(f"{name} {len(split):,} blocks ({len(split) * block_size:,} tokens)" for name, split in packed.items())
    return f"Data: {sizes} of {block_size} tokens"
