"""Continue a prompt, or answer one chat turn, with a trained model folder (ours or any HF causal LM).

    python generate.py --model out/pt --prompt "The for statement" --max_new_tokens 80
    python generate.py --model out/pt --prompt "def " --temperature 0      # greedy
    python generate.py --model out/sft --chat "What does str.upper() do?"  # through the chat template
"""

import argparse

from utils.errors import UserError, cli_entry
from utils.generation import chat_reply, generate_text, load_for_inference


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder with its tokenizer")
    parser.add_argument("--prompt", help="text to continue")
    parser.add_argument("--chat", help="a user message, answered through the tokenizer's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.chat is None):
        raise UserError("give exactly one of --prompt and --chat")
    model, tokenizer = load_for_inference(args.model)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed}
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.chat}]
        print(f"user: {args.chat}\nassistant: {chat_reply(model, tokenizer, messages, **sampling)}")
    else:
        print(args.prompt + generate_text(model, tokenizer, args.prompt, **sampling))


if __name__ == "__main__":
    main()
