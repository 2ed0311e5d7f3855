"""The data of the tasks in this folder, generated at load time by dstrain/eval/python_tasks.py from the
running Python itself (lm-evaluation-harness finds this module beside the YAMLs: `!function python_tasks.<name>`)."""

from dstrain.eval.python_tasks import docstring_dataset, docstring_text_dataset, expression_dataset  # noqa: F401
