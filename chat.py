"""Chat with a trained model: interactively, one question, or a file of questions answered in batches.

    python chat.py --model out/sft                                   # interactive; /reset, /exit
    python chat.py --model out/sft --question "What does str.upper() do?" --temperature 0
    python chat.py --model out/lora --questions q.json --output answers.json --batch_size 16
    python chat.py --model out/lora --base out/pt --question "Hi"    # an adapter on a base of your choice
    python chat.py --model out/llava-sft --image cat.png --question "What is this?"   # image-text models

--model is a model folder or a PEFT adapter folder (lora.py's output, loaded on its base). A model
without a chat template (a plain pretrained one from elsewhere) continues the text instead.
Questions files: a JSON list or JSON Lines of strings, {"question": ..., "system"?: ..., "id"?: ...}
or {"messages": [..., {"role": "user", ...}]}, each with "images" (paths) for an image-text model
(placed at the `<image>` placeholders, or before the question); the answers file repeats each with its answer, the
sampling settings and the timing.
"""

import argparse
import time
from pathlib import Path

from transformers.utils import logging as transformers_logging

from dstrain.cli import cli_entry
from dstrain.data.chat_template import has_chat_template
from dstrain.errors import UserError
from dstrain.infer.chat_session import answer_one, answer_questions, interactive_chat, read_questions, write_answers
from dstrain.infer.images import open_image, require_image_model
from dstrain.infer.model_loading import add_model_flags, load_model_from_args
from dstrain.infer.sampling import add_sampling_flags, sampling_from_args


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--question", help="answer this one question and exit")
    parser.add_argument("--questions", help="a JSON or JSONL file of questions to answer in batches (needs --output)")
    parser.add_argument("--output", help="where --questions writes its answers (JSON)")
    parser.add_argument("--batch_size", type=int, default=8, help="questions generated together in --questions mode")
    parser.add_argument("--system", help="a system message before every conversation")
    parser.add_argument("--image", action="append", default=[],
                        help="image-text models: an image (path) to ask about with --question, or with the first "
                             "message of an interactive chat (repeat for several; /image PATH in the chat)")
    add_sampling_flags(parser, max_new_tokens=256, temperature=0.7)
    return parser


def check_mode(args) -> None:
    if args.question is not None and args.questions is not None:
        raise UserError("give --question or --questions, not both")
    if (args.questions is None) != (args.output is None):
        raise UserError("--questions and --output go together")
    if args.image and args.questions is not None:
        raise UserError("--image goes with --question or the interactive chat; a --questions file names its own "
                        "images ({\"question\": ..., \"images\": [...]})")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.output and Path(args.output).resolve() == Path(args.questions).resolve():
        raise UserError(f"--output {args.output} is the questions file; choose another name")


@cli_entry
def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    check_mode(args)
    sampling = sampling_from_args(args)
    questions = read_questions(Path(args.questions), args.system) if args.questions else None  # bad files fail fast

    transformers_logging.disable_progress_bar()  # the chat is the output
    loaded = load_model_from_args(args)
    if args.image:
        require_image_model(loaded, "--image")
    images = [open_image(path, where="--image", index=i) for i, path in enumerate(args.image)]

    if questions is not None:
        start = time.perf_counter()
        answers = answer_questions(loaded, questions, sampling, args.batch_size)
        seconds = time.perf_counter() - start
        settings = {"model": args.model, "base": args.base, "system": args.system, "batch_size": args.batch_size,
                    "chat_template": has_chat_template(loaded.tokenizer), "device": str(loaded.model.device),
                    **sampling.describe()}
        report = write_answers(Path(args.output), questions, answers, settings, seconds)
        timing = report["timing"]
        print(f"Answered {timing['questions']} questions in {timing['seconds']:.1f}s "
              f"({timing['tokens_per_s']} generated tokens/s): wrote {args.output}")
    elif args.question is not None:
        answer_one(loaded, sampling, args.system, args.question, images)
    else:
        interactive_chat(loaded, sampling, args.system, images=images)


if __name__ == "__main__":
    main()
