"""The evaluation tasks the project ships (eval_tasks/), generated from what every CPython carries, so
evaluation runs with no download and no network, and nothing taken from elsewhere is committed.

    python_docstrings   multiple choice: the first sentence of a docstring of the standard library
                        (builtins, str/list/dict/set methods, math, os.path) -> which of four names
                        of the same family it documents; scored by log-likelihood (acc, acc_norm)
    python_docstring_perplexity
                        the whole docstrings of the same callables, scored by rolling log-likelihood:
                        word_perplexity, byte_perplexity, bits_per_byte (a continuous score, so it moves
                        with every step of training, where a small model's accuracies sit at chance)
    python_expressions  generation: the value of a small Python expression (arithmetic, len, str
                        methods, sorted, ...), made from a seeded random draw and computed by Python
                        itself; scored by exact match of the greedy answer, up to the first newline

Source and licence: the docstrings are read at run time from the running interpreter's own
objects (`inspect.getdoc`), as the demo corpus reads `pydoc_data.topics` (dstrain/data/python_docs.py);
the expressions are synthetic. The repository holds only this generator and the task YAMLs, never the
generated questions. Docstrings change a little between Python releases: scores compare within one
Python minor version (3.11 here; the harness results record the version).

The docstrings are not the demo's pretraining text (pydoc_data.topics is the reference manual, written
apart from them), although a few sentences say the same thing: `audit.py --contamination
python_docstrings` measures that overlap.
"""

import builtins
import inspect
import math
import os.path
import random
import re

from datasets import Dataset, DatasetDict

CHOICES = 4

# Families of callables whose docstrings make the questions; distractors come from the same family,
# so "str." alone never gives the answer away.
FAMILIES = {
    "builtins": (builtins, ""),
    "str": (str, "str."),
    "list": (list, "list."),
    "dict": (dict, "dict."),
    "set": (set, "set."),
    "math": (math, "math."),
    "os.path": (os.path, "os.path."),
}


def docstring_summary(obj) -> str | None:
    """The first sentence of an object's docstring, or None when it is a signature line
    (`abs(x) -> ...`), too short to be a question, or absent."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", paragraph)[0]
    if "->" in sentence or re.match(r"^[\w.]+\(", sentence) or len(sentence.split()) < 4:
        return None
    return sentence


def _documented(owner, prefix: str) -> list[tuple[str, object]]:
    """(name, callable) for the public callables of `owner`, exceptions left out."""
    members = []
    for name in sorted(dir(owner)):
        obj = getattr(owner, name)
        if name.startswith("_") or not callable(obj):
            continue
        if isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        members.append((prefix + name, obj))
    return members


def _family_members(owner, prefix: str) -> list[tuple[str, str]]:
    return [(name, summary) for name, obj in _documented(owner, prefix) if (summary := docstring_summary(obj))]


def docstring_questions(seed: int = 0) -> list[dict]:
    """One question per documented callable: {"family", "summary", "choices" (4 names), "label"}.
    A summary shared by several callables (help texts such as copyright/credits) is left out."""
    rng = random.Random(seed)
    families = {family: _family_members(owner, prefix) for family, (owner, prefix) in FAMILIES.items()}
    counts: dict[str, int] = {}
    for members in families.values():
        for _, summary in members:
            counts[summary] = counts.get(summary, 0) + 1
    questions = []
    for family, members in families.items():
        names = [name for name, _ in members]
        for name, summary in members:
            if counts[summary] > 1 or len(names) < CHOICES:
                continue
            choices = [name] + rng.sample([other for other in names if other != name], CHOICES - 1)
            rng.shuffle(choices)
            questions.append({"family": family, "summary": summary, "choices": choices,
                              "label": choices.index(name)})
    rng.shuffle(questions)  # families mixed, so the few-shot pool (the first few) is not all builtins
    return questions


def docstring_texts() -> list[dict]:
    """{"name", "text"}: the whole docstring of every callable whose summary makes a question above."""
    texts = []
    for family, (owner, prefix) in FAMILIES.items():
        for name, obj in _documented(owner, prefix):
            if docstring_summary(obj):
                texts.append({"name": name, "text": inspect.getdoc(obj)})
    return texts


# Each maker returns the expression's source; Python computes the answer (repr of the value).
WORDS = ["python", "stack", "queue", "value", "index", "tuple", "module", "lambda", "string", "object",
         "import", "class", "float", "yield", "range", "print", "list", "dict", "set", "file"]


def _expression(rng: random.Random) -> str:
    a, b, word = rng.randint(2, 99), rng.randint(2, 19), rng.choice(WORDS)
    numbers = rng.sample(range(1, 50), rng.randint(3, 5))
    makers = [
        lambda: f"{a} + {b}",
        lambda: f"{a} - {b}",
        lambda: f"{a} * {b}",
        lambda: f"{a} // {b}",
        lambda: f"{a} % {b}",
        lambda: f"len({word!r})",
        lambda: f"{word!r}.upper()",
        lambda: f"{word!r}[::-1]",
        lambda: f"{word!r}[{rng.randint(0, len(word) - 1)}]",
        lambda: f"sorted({numbers})",
        lambda: f"max({numbers})",
        lambda: f"min({numbers})",
        lambda: f"sum({numbers})",
        lambda: f"abs(-{a})",
        lambda: f"{word!r}.count({rng.choice(word)!r})",
    ]
    return rng.choice(makers)()


def expression_questions(count: int = 200, seed: int = 0) -> list[dict]:
    """{"expression", "answer"}: `count` distinct expressions and the repr of their values."""
    rng, seen, questions = random.Random(seed), set(), []
    while len(questions) < count:
        expression = _expression(rng)
        if expression in seen:
            continue
        seen.add(expression)
        # Only the expressions made above are evaluated, with no builtins but the few they use.
        value = eval(expression, {"__builtins__": {}}, {"len": len, "sorted": sorted, "max": max, "min": min,
                                                        "sum": sum, "abs": abs})
        questions.append({"expression": expression, "answer": repr(value)})
    return questions


# ===== what the task YAMLs call (eval_tasks/python_tasks.py: `custom_dataset: !function ...`) =====

def docstring_dataset(**_metadata) -> DatasetDict:
    """The python_docstrings task's data: the first 8 questions are the few-shot pool (train),
    the rest the test split."""
    questions = docstring_questions()
    return DatasetDict({"train": Dataset.from_list(questions[:8]), "test": Dataset.from_list(questions[8:])})


def docstring_text_dataset(**_metadata) -> DatasetDict:
    """The python_docstring_perplexity task's data: every docstring, one test document each."""
    return DatasetDict({"test": Dataset.from_list(docstring_texts())})


def expression_dataset(**_metadata) -> DatasetDict:
    """The python_expressions task's data: 8 few-shot examples and 200 test questions, all distinct."""
    questions = expression_questions(208)
    return DatasetDict({"train": Dataset.from_list(questions[:8]), "test": Dataset.from_list(questions[8:])})
