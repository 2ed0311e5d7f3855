"""Evaluate a trained model: benchmarks through EleutherAI's lm-evaluation-harness, or chat answers
scored against reference answers and by a reward model.

Benchmarks (the harness's tasks, the ones shipped in eval_tasks/, your own task YAMLs):
    python eval.py --model out/sft --tasks arc_easy,hellaswag,mmlu,ceval-valid,cmmlu \
        --num_fewshot 5 --batch_size 16 --output out/sft/eval.json
    python eval.py --model out/demo/sft --tasks python_local        # shipped tasks: no download, no network
    python eval.py --model out/lora --tasks python_docstrings       # an adapter folder, on its base
    python eval.py --model out/sft --tasks my_task --include_path my_tasks/ --apply_chat_template
Every GPU of the node, data parallel (each rank scores its share; rank 0 prints and writes):
    torchrun --nproc_per_node 8 eval.py --model out/sft --tasks mmlu --output out/sft/eval.json
Chat evaluation: a questions file as chat.py reads it, with reference answers ("answer", a string or
a list, for exact match; "answer_regex" for a regular expression), scored too by a reward model;
--compare answers the same prompts with a second model and reports the reward model's win rate:
    python eval.py chat --model out/sft --questions q.jsonl --reward_model out/rm \
        --compare out/sft-v1 --output out/sft/chat_eval.json

Offline, the harness's tasks read their data from the local datasets cache (--offline auto checks
whether the hub can be reached); the shipped tasks generate theirs from the running Python.
"""

import argparse
import sys
import time
from pathlib import Path

from transformers.utils import logging as transformers_logging

from dstrain.cli import cli_entry
from dstrain.data.chat_template import has_chat_template
from dstrain.distributed import finish, join_data_parallel_ranks, print0
from dstrain.errors import UserError
from dstrain.eval.chat_eval import references, score_answers, summary_lines, write_report
from dstrain.eval.harness import (
    HarnessSettings,
    LoadedModelLM,
    evaluate,
    hub_reachable,
    load_tasks,
    log_results_to_wandb,
    quiet_harness,
    read_from_local_cache_only,
    results_table,
    split_names,
    task_manager_for,
    write_results,
)
from dstrain.infer.chat_session import answer_questions, read_questions
from dstrain.infer.model_loading import add_model_flags, load_inference_model, release
from dstrain.infer.sampling import add_sampling_flags, sampling_from_args
from dstrain.infer.scoring import load_reward_model, rewards


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task, group or tag names (python_local: the shipped tasks)")
    parser.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: each task's own, else 0)")
    parser.add_argument("--batch_size", type=int, default=8, help="requests scored together on each rank")
    parser.add_argument("--limit", type=float, help="items per task (testing); below 1, a fraction of each task")
    parser.add_argument("--include_path", action="append", default=[],
                        help="a folder of your own task YAMLs (repeatable)")
    parser.add_argument("--apply_chat_template", action="store_true",
                        help="prompts through the tokenizer's chat template (chat models)")
    parser.add_argument("--fewshot_as_multiturn", action="store_true",
                        help="with --apply_chat_template: few-shot examples as earlier turns of the chat")
    parser.add_argument("--system_instruction", help="a system message (or prefix) before every prompt")
    parser.add_argument("--seed", type=int, default=1234, help="the harness's seeds (few-shot draws)")
    parser.add_argument("--output", help="write the results here (JSON); --log_samples adds <name>.samples.jsonl")
    parser.add_argument("--log_samples", action="store_true", help="also write every item's prompt, answers and score")
    parser.add_argument("--offline", choices=["auto", "true", "false"], default="auto",
                        help="read the harness's task data from the local datasets cache only (auto: when the "
                             "hub cannot be reached)")
    parser.add_argument("--report_to", choices=["none", "wandb"], default="none", help="wandb: log the results table")
    parser.add_argument("--wandb_project", default=None, help="WandB project (default: $WANDB_PROJECT, else dstrain)")
    parser.add_argument("--run_name", default=None, help="WandB run name")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    return parser


def harness_settings(args) -> HarnessSettings:
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name such as {args.output}/eval.json")
    return HarnessSettings(
        tasks=split_names(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
        include_paths=tuple(args.include_path), apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction, seed=args.seed,
        log_samples=args.log_samples)


@cli_entry
def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    settings = harness_settings(args)
    quiet_harness()
    transformers_logging.disable_progress_bar()

    # ===== 1. the ranks: data parallel when a launcher started several =====
    device = join_data_parallel_ranks()

    # ===== 2. the tasks and their data, before any model is loaded =====
    manager, all_local = task_manager_for(settings.tasks, settings.include_paths)
    if not all_local and (args.offline == "true" or (args.offline == "auto" and not hub_reachable())):
        read_from_local_cache_only()
        print0("Offline: the harness's tasks read their data from the local datasets cache")
    load_tasks(manager, settings.tasks)

    # ===== 3. the model (or adapter on its base) on this rank's device =====
    loaded = load_inference_model(args.model, args.base, device=str(device) if device else args.device,
                                  trust_remote_code=args.trust_remote_code)
    if settings.apply_chat_template and not has_chat_template(loaded.tokenizer):
        raise UserError(f"--apply_chat_template: the tokenizer of {args.model} has no chat template")
    lm = LoadedModelLM(loaded.model, loaded.tokenizer, settings.batch_size, data_parallel=True,
                       max_length=loaded.context)

    # ===== 4. evaluate; rank 0 prints the table, writes the JSON, logs to WandB =====
    results = evaluate(lm, settings, manager)
    if results is not None:
        print(results_table(results))
        described = {"model": args.model, "base": args.base, "adapter": loaded.main_adapter,
                     "ranks": lm.world_size, **vars(settings)}
        if args.report_to == "wandb":
            log_results_to_wandb(results, args.wandb_project, args.run_name, args.output)
        if args.output:
            write_results(Path(args.output), results, described)
            print(f"Wrote {args.output}")
    finish()


def make_chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval.py chat", description="Answer a questions file and score the answers: "
                                     "exact match or a regex against references, a reward model, a second model.")
    add_model_flags(parser)
    parser.add_argument("--questions", required=True, help="chat.py's questions file, with optional \"answer\" / "
                                                           "\"answer_regex\" references per record")
    parser.add_argument("--output", required=True, help="the answers, their scores and the summary (JSON)")
    parser.add_argument("--reward_model", help="a reward.py output folder: scores every answer")
    parser.add_argument("--compare", help="a second model (or adapter) folder answering the same prompts; the reward "
                                          "model decides which answer is better")
    parser.add_argument("--compare_base", help="the base of a --compare adapter (default: the one its config names)")
    parser.add_argument("--batch_size", type=int, default=8, help="questions answered (and scored) together")
    parser.add_argument("--system", help="a system message before every question without its own")
    add_sampling_flags(parser, max_new_tokens=256, temperature=0.0)
    return parser


@cli_entry
def chat(argv=None) -> None:
    args = make_chat_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.compare and not args.reward_model:
        raise UserError("--compare needs --reward_model: it decides which of the two answers is better")
    if Path(args.output).resolve() == Path(args.questions).resolve():
        raise UserError(f"--output {args.output} is the questions file; choose another name")
    sampling = sampling_from_args(args)
    transformers_logging.disable_progress_bar()

    # ===== 1. the questions and their references, checked before any model is loaded =====
    questions = read_questions(Path(args.questions), args.system)
    for question in questions:
        references(question)

    # ===== 2. each model answers in batches (chat.py's path), one model in memory at a time =====
    answers, started = {}, time.perf_counter()
    for label, model, base in (("model", args.model, args.base), ("compare", args.compare, args.compare_base)):
        if model is not None:
            loaded = load_inference_model(model, base, device=args.device, trust_remote_code=args.trust_remote_code)
            answers[label] = answer_questions(loaded, questions, sampling, args.batch_size)
            release(loaded)

    # ===== 3. the reward model scores every answer, rendered as in its training =====
    scores = None
    if args.reward_model:
        reward_model, tokenizer = load_reward_model(args.reward_model)
        prompts = [question.messages for question in questions]
        scores = {label: rewards(reward_model, tokenizer, prompts, [a.text for a in model_answers], args.batch_size)
                  for label, model_answers in answers.items()}

    # ===== 4. scores with their intervals, the win rate: printed and written =====
    report = score_answers(questions, answers, scores)
    report["settings"] = {"model": args.model, "base": args.base, "compare": args.compare,
                          "compare_base": args.compare_base, "reward_model": args.reward_model,
                          "questions": args.questions, "system": args.system, "batch_size": args.batch_size,
                          "seconds": round(time.perf_counter() - started, 3), **sampling.describe()}
    write_report(Path(args.output), report)
    print("\n".join(summary_lines(report)))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["chat"]:
        chat(sys.argv[2:])
    else:
        main()
