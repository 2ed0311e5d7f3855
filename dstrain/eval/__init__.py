"""Evaluation: how a model compares on benchmarks, how it answers, and whether the numbers mean anything.

    harness.py        lm-evaluation-harness on a model already loaded (eval.py, and --eval_tasks during
                      training through dstrain/train/eval_tasks.py): task lookup, data parallelism, results
    python_tasks.py   the data of the tasks shipped in eval_tasks/, generated from the running Python
    chat_eval.py      answers to a questions file scored by exact match, a regex, a reward model; two models
                      compared on the same prompts (win rate with a confidence interval)
    contamination.py  n-gram overlap between training records and benchmark items (audit.py --contamination,
                      --decontaminate_against / --decontaminate, applied where dstrain/data/cache.py reads records)

Imports: eval uses data, model and infer; train (--eval_tasks), audit (the contamination report) and
arguments (the contamination filter) use eval. lm-evaluation-harness is imported only where a harness
task is run or read.
"""
