"""Fold a LoRA adapter into its base model and write a plain HF folder that loads without PEFT.

    python export.py --adapter out/lora --output_dir out/merged            # base read from the adapter
    python export.py --base out/pt --adapter out/lora --output_dir out/merged
    python export.py --adapter out/rm-lora --output_dir out/rm      # a reward model's adapter + score head
"""

import argparse
from pathlib import Path

from transformers import GenerationConfig

from dstrain.cli import cli_entry
from dstrain.model.adapters import load_adapter_model
from dstrain.model.loading import load_tokenizer


def merge(adapter: Path, output_dir: Path, base: str | None = None) -> None:
    peft_model, base = load_adapter_model(adapter, base)
    merged = peft_model.merge_and_unload()
    if (adapter / "generation_config.json").is_file():  # the chat stop tokens lora.py and dpo.py save
        merged.generation_config = GenerationConfig.from_pretrained(str(adapter))
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    load_tokenizer(str(tokenizer_source)).save_pretrained(output_dir)
    print(f"Merged {adapter} into {base}: wrote {output_dir}")


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the PEFT adapter folder lora.py wrote")
    parser.add_argument("--base", help="the base model folder; defaults to the one the adapter names")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    adapter = Path(args.adapter)
    merge(adapter, Path(args.output_dir), args.base)


if __name__ == "__main__":
    main()
