"""Fold a LoRA adapter into its base model and write a plain HF folder that loads without PEFT.

    python export.py --adapter out/lora --output_dir out/merged            # base read from the adapter
    python export.py --base out/pt --adapter out/lora --output_dir out/merged
"""

import argparse
import json
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig

from utils.errors import UserError, cli_entry
from utils.modeling import load_tokenizer


def base_of(adapter: Path) -> str:
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json (is it a PEFT adapter folder from lora.py?)")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config} names no base model: pass --base")
    return base


def merge(base: str, adapter: Path, output_dir: Path) -> None:
    if not Path(base).exists():
        raise UserError(f"base model not found: {base} (pass --base)")
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if (adapter / "generation_config.json").is_file():  # lora.py's stop tokens for chat
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
    merge(args.base or base_of(adapter), adapter, Path(args.output_dir))


if __name__ == "__main__":
    main()
