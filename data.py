"""Check and prepare corpora before a GPU hour is spent on them.

    python data.py validate corpus/*.jsonl                 # every bad line, with its file and line
    python data.py convert notes/ --output corpus.jsonl     # text files -> JSONL ({"text": ...})
    python data.py convert book.txt --split_by paragraph --output book.jsonl
    python data.py python-docs --output demo.jsonl          # a real corpus every CPython carries
    python data.py python-docs-chat --output chat.jsonl     # and a small chat set made from it
    python data.py python-docs-preferences --output prefs.jsonl   # and preference pairs
    python data.py prepare pretrain.py configs/pretrain_tiny.json   # the training run's cache, built now

Exit codes: 0 all good, 1 validate found bad records, 2 the command could not run.
"""

import argparse
import sys
import time
from pathlib import Path

from dstrain.arguments import CorpusArguments, ModelArguments
from dstrain.cli import build, cli_entry, parse_namespace, script_arguments
from dstrain.data.python_docs import documentation_chats, documentation_preferences, documentation_texts
from dstrain.data.records import ReadStats, expand_inputs, iter_texts, write_jsonl_atomically
from dstrain.errors import UserError
from dstrain.stages import stage_data, stage_of

SPLITS = ("line", "paragraph", "file")


def validate(args) -> int:
    stats = ReadStats()
    files = expand_inputs(args.files, "files")
    try:
        for _ in iter_texts(files, args.text_field, skip_bad_records=True, stats=stats):
            pass
    except UserError:
        if stats.skipped == 0:  # an empty corpus; with bad records we list them below instead
            raise
    for problem in stats.problems[: args.max_reports]:
        print(problem)
    if stats.skipped > args.max_reports:
        print(f"... and {stats.skipped - args.max_reports} more")
    print(f"{stats.files} files, {stats.samples:,} samples, {stats.characters:,} characters, "
          f"{stats.skipped} bad records")
    return 1 if stats.skipped else 0


def _text_samples(path: Path, split_by: str):
    """Samples of one text file, strictly decoded so a bad byte is reported, not replaced."""
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8") from None
    if split_by == "file":
        pieces = [content]
    elif split_by == "paragraph":
        pieces = content.replace("\r\n", "\n").split("\n\n")
    else:  # only "\n" ends a line, exactly as the training readers see a text file
        pieces = [line.removesuffix("\r") for line in content.split("\n")]
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def convert(args) -> int:
    files = expand_inputs(args.files, "files")
    output = Path(args.output)
    if output.resolve() in {f.resolve() for f in files}:
        raise UserError(f"--output {output} is one of the inputs; choose another file")
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} exists; pass --overwrite to replace it")
    records = ({args.text_field: text} for path in files for text in _text_samples(path, args.split_by))
    count = write_jsonl_atomically(output, records, ", ".join(map(str, files[:3])))
    print(f"Wrote {count:,} records from {len(files)} files to {output}")
    return 0


def python_docs(args) -> int:
    """Python's documentation topics (about 465 K characters), one record per topic."""
    records = ({"text": text} for text in documentation_texts())
    count = write_jsonl_atomically(Path(args.output), records, "pydoc_data.topics")
    print(f"Wrote {count} documentation topics to {args.output}")
    return 0


def python_docs_chat(args) -> int:
    """Questions and answers drawn from the same documentation, in the messages format."""
    count = write_jsonl_atomically(Path(args.output), documentation_chats(), "pydoc_data.topics")
    print(f"Wrote {count} conversations to {args.output}")
    return 0


def python_docs_preferences(args) -> int:
    """Preference pairs from the same documentation: each answer against its words scrambled."""
    count = write_jsonl_atomically(Path(args.output), documentation_preferences(), "pydoc_data.topics")
    print(f"Wrote {count} preference pairs to {args.output}")
    return 0


def prepare(args) -> int:
    """Build exactly the cache the training script will look for, from its own arguments (JSON config
    and/or flags, read with its own parser), with every core; the run then starts on the cached data."""
    if not Path(args.script).is_file():
        raise UserError(f"prepare: no training script at {args.script}")
    dataclass_types = script_arguments(args.script)
    data_types = [kind for kind in dataclass_types if issubclass(kind, CorpusArguments)]
    if not data_types:
        raise UserError(f"prepare: {args.script} reads no training data")
    namespace = parse_namespace(dataclass_types, args.script_args)
    data_args = build(data_types[0], namespace)
    started = time.perf_counter()
    _, _, data = stage_data(stage_of(data_args), build(ModelArguments, namespace), data_args, namespace.seed)
    splits = ", ".join(f"{name} {len(split):,} rows" for name, split in data.items())
    print(f"Prepared the data of {args.script} in {time.perf_counter() - started:.1f}s: {splits}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("validate", help="report every bad record of a corpus")
    check.add_argument("files", nargs="+", help="JSONL or text files, folders, or globs")
    check.add_argument("--text_field", default="text")
    check.add_argument("--max_reports", type=int, default=50, help="list at most this many bad records")
    check.set_defaults(run=validate)

    to_jsonl = commands.add_parser("convert", help="turn text files into JSONL")
    to_jsonl.add_argument("files", nargs="+", help="text files, folders, or globs")
    to_jsonl.add_argument("--output", required=True)
    to_jsonl.add_argument("--split_by", choices=SPLITS, default="line",
                          help="one record per line, per blank-line paragraph, or per file")
    to_jsonl.add_argument("--text_field", default="text")
    to_jsonl.add_argument("--overwrite", action="store_true")
    to_jsonl.set_defaults(run=convert)

    docs = commands.add_parser("python-docs", help="write Python's own documentation as a JSONL corpus")
    docs.add_argument("--output", required=True)
    docs.set_defaults(run=python_docs)

    chats = commands.add_parser("python-docs-chat", help="write a small chat set made from Python's documentation")
    chats.add_argument("--output", required=True)
    chats.set_defaults(run=python_docs_chat)

    prefs = commands.add_parser("python-docs-preferences",
                                help="write preference pairs (an answer vs its words scrambled) from Python's documentation")
    prefs.add_argument("--output", required=True)
    prefs.set_defaults(run=python_docs_preferences)

    ready = commands.add_parser("prepare", help="build a training run's data cache now (its script, then its arguments)",
                                prefix_chars="\0")  # every flag after the script is the script's
    ready.add_argument("script", help="the training script: pretrain.py, sft.py, lora.py, reward.py or dpo.py")
    ready.add_argument("script_args", nargs=argparse.REMAINDER, help="its JSON config and/or flags")
    ready.set_defaults(run=prepare)
    return parser


@cli_entry
def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
