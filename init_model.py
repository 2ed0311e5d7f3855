"""Write a randomly initialised model, sized by a preset and shaped by a tokenizer, to a folder.

    python init_model.py --tokenizer_name tok --config_name llama-120m --output_dir out/init
    python init_model.py --tokenizer_name tok --config_name tiny --output_dir out/init \
        --config_overrides "num_hidden_layers=4" --pad_vocab_size_to_multiple_of 64

The folder holds the model and tokenizer and loads with AutoModelForCausalLM / AutoTokenizer;
pretrain.py --model_name_or_path out/init trains it further. To check that a model and a
tokenizer were made for each other: python init_model.py --check out/model --tokenizer_name tok
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from dstrain.arguments import ModelArguments
from dstrain.cli import cli_entry, parse_args
from dstrain.errors import UserError
from dstrain.model.loading import build_model, load_tokenizer, model_config_for


@dataclass
class InitArguments:
    output_dir: str = field(default="", metadata={"help": "Folder to write the model and tokenizer to."})
    seed: int = field(default=42, metadata={"help": "Seed for the random initialisation."})
    check: bool = field(default=False, metadata={"help": "Only check that --model_name_or_path and "
                                                          "--tokenizer_name agree; write nothing."})


def main(model_args: ModelArguments, init_args: InitArguments) -> None:
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    config = model_config_for(model_args, tokenizer)  # refuses a pair that disagrees
    if init_args.check:
        print(f"OK: {model_args.model_name_or_path or model_args.config_name} and {model_args.tokenizer_name} agree "
              f"(vocab {config.vocab_size} >= {len(tokenizer)} tokens, bos/eos/pad "
              f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}/{tokenizer.pad_token_id})")
        return
    if not init_args.output_dir:
        raise UserError("--output_dir is required")
    set_seed(init_args.seed)
    model = build_model(model_args, config)
    Path(init_args.output_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(init_args.output_dir)
    tokenizer.save_pretrained(init_args.output_dir)
    print(f"Saved to {init_args.output_dir}")


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args((ModelArguments, InitArguments))))()
