"""Continue a prompt, or answer one chat turn, with a trained model folder (ours or any HF causal LM)
or a LoRA adapter folder. For conversations, batches of questions and serving: chat.py and serve.py.

    python generate.py --model out/pt --prompt "The for statement" --max_new_tokens 80
    python generate.py --model out/pt --prompt "def " --temperature 0      # greedy
    python generate.py --model out/sft --chat "What does str.upper() do?"  # through the chat template
    python generate.py --model out/lora --chat "Hi" --top_k 40 --repetition_penalty 1.2
"""

import argparse

from transformers.utils import logging as transformers_logging

from dstrain.cli import cli_entry
from dstrain.errors import UserError
from dstrain.infer.generation import chat_prompt_ids, generate_one, text_prompt_ids
from dstrain.infer.model_loading import add_model_flags, load_model_from_args
from dstrain.infer.sampling import add_sampling_flags, sampling_from_args


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--prompt", help="text to continue")
    parser.add_argument("--chat", help="a user message, answered through the tokenizer's chat template")
    parser.add_argument("--system", help="system message for --chat")
    add_sampling_flags(parser, max_new_tokens=64, temperature=0.8)
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.chat is None):
        raise UserError("give exactly one of --prompt and --chat")
    sampling = sampling_from_args(args)
    transformers_logging.disable_progress_bar()
    loaded = load_model_from_args(args)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.chat}]
        reply = generate_one(loaded, chat_prompt_ids(loaded.tokenizer, messages), sampling, chat=True)
        print(f"user: {args.chat}\nassistant: {reply.text.strip()}")
    else:
        continuation = generate_one(loaded, text_prompt_ids(loaded.tokenizer, args.prompt), sampling, chat=False)
        print(args.prompt + continuation.text)


if __name__ == "__main__":
    main()
