"""Train a byte-level BPE tokenizer on your corpus and save it in the HuggingFace format.

    python tokenizer.py --train_files corpus/*.jsonl --output_dir tok --vocab_size 32000
    python tokenizer.py --train_files books/ notes.txt --text_field content --output_dir tok

JSONL records give their `--text_field`; text files give one sample per line. The corpus is
streamed, so it may be larger than memory. The result loads with AutoTokenizer.from_pretrained.
"""

from dataclasses import dataclass, field
from pathlib import Path

from dstrain.cli import cli_entry, parse_args
from dstrain.data.records import ReadStats, expand_inputs, iter_texts
from dstrain.data.tokenizer import NORMALIZERS, SPECIAL_TOKENS, train_bpe_tokenizer
from dstrain.errors import UserError


@dataclass
class TokenizerArguments:
    train_files: list[str] = field(default_factory=list, metadata={"help": "JSONL or text files, folders, or globs."})
    output_dir: str = field(default="", metadata={"help": "Folder to write the tokenizer to."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Merges seen fewer times than this are not learned."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSONL records."})
    normalization: str = field(
        default="nfkc",
        metadata={"help": "nfkc folds compatibility characters (full-width ，→ , ﬁ → fi) before tokenizing; "
                          "none keeps every character exactly.", "choices": sorted(NORMALIZERS)},
    )
    model_max_length: int = field(default=2048, metadata={"help": "Longest sequence the tokenizer will mark as valid."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip malformed records instead of stopping."})

    def __post_init__(self):
        if not self.train_files:
            raise UserError("--train_files is required")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        if self.vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise UserError(f"--vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (special tokens and the 256 bytes)")


def main(args: TokenizerArguments) -> None:
    files = expand_inputs(args.train_files)
    stats = ReadStats()
    texts = iter_texts(files, args.text_field, args.skip_bad_records, stats)
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size, args.min_frequency, args.normalization,
                                    args.model_max_length)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Trained on {stats.samples:,} samples ({stats.characters:,} characters) from {stats.files} files")
    if stats.skipped:
        print(f"Skipped {stats.skipped} bad records; first: {stats.problems[0]}")
    print(f"Saved a {len(tokenizer):,}-token tokenizer to {args.output_dir}")


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args((TokenizerArguments,))))()
