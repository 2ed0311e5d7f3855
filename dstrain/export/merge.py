"""Folding a LoRA adapter into its base model, and the plain model folder every export starts from."""

import contextlib
import tempfile
from pathlib import Path

from transformers import GenerationConfig

from dstrain.errors import UserError
from dstrain.model.adapters import is_adapter_folder, load_adapter_model
from dstrain.model.loading import load_tokenizer


def merge_adapter(adapter: Path, output_dir: Path, base: str | None = None, quiet: bool = False) -> None:
    """Write the adapter's base with the adapter folded in, with the tokenizer and chat stop tokens."""
    peft_model, base = load_adapter_model(adapter, base)
    merged = peft_model.merge_and_unload()
    if (adapter / "generation_config.json").is_file():  # the chat stop tokens lora.py and dpo.py save
        merged.generation_config = GenerationConfig.from_pretrained(str(adapter))
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    load_tokenizer(str(tokenizer_source)).save_pretrained(output_dir)
    if not quiet:
        print(f"Merged {adapter} into {base}: wrote {output_dir}")


@contextlib.contextmanager
def plain_model_folder(model: Path, base: str | None, scratch_parent: Path):
    """`model` itself when it is a model folder; for an adapter folder, the adapter merged into its base
    in a scratch folder (beside the output, not in /tmp: a large model may not fit there), removed
    afterwards."""
    if not model.is_dir():
        raise UserError(f"--model {model}: no such folder")
    if not is_adapter_folder(model):
        if not (model / "config.json").is_file():
            raise UserError(f"--model {model}: no config.json (is it a model folder saved by this project?)")
        yield model
        return
    scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=scratch_parent) as scratch:
        merge_adapter(model, Path(scratch), base, quiet=True)
        print(f"Merged the adapter {model} into its base for the export")
        yield Path(scratch)
