"""Continue a prompt with a trained model folder (pretrain.py's output, or any HF causal LM).

    python generate.py --model out/pt --prompt "The for statement" --max_new_tokens 80
    python generate.py --model out/pt --prompt "def " --temperature 0      # greedy
"""

import argparse

from utils.errors import cli_entry
from utils.generation import generate_text, load_for_inference


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder with its tokenizer")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = load_for_inference(args.model)
    print(args.prompt + generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_p, args.seed))


if __name__ == "__main__":
    main()
