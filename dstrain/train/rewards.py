"""The rewards grpo.py trains on: built-in checks, the user's own Python functions, reward models.

`--reward_funcs` takes any mix of
  exact_answer    1 when the completion's final answer equals the record's answer field, else 0. The final
                  answer is the last \\boxed{...}, else the text after the last "answer:", else the whole
                  reply; compared case-folded, whitespace collapsed, a trailing period ignored.
  math_answer     1 when the completion's answer is mathematically equal to the record's (1/2 = 0.5 =
                  \\frac{1}{2}), by HuggingFace's math-verify (LaTeX and plain expressions through SymPy),
                  the checker TRL's own accuracy reward and the open-R1 recipes use; else 0.
  format          1 when the whole completion matches --format_pattern (a regex; by default DeepSeek-R1's
                  <think>...</think><answer>...</answer>), else 0.
  length          1 - completion tokens / --max_completion_length: shorter replies score higher, a reply
                  cut at the limit scores 0.
  module:function or path/to/file.py:function
                  TRL's reward signature: f(prompts, completions, **kwargs) -> one number (or None: not
                  applicable) per completion; every other field of the prompt records arrives as a kwarg
                  list, with completion_ids, trainer_state and TRL's log hooks.
  a folder        a reward model from reward.py (AutoModelForSequenceClassification with one score), which
                  scores the prompt and completion rendered through its own tokenizer's chat template.

Every function's output is checked as it comes (one value per completion, each a finite number or None):
a function that raises or returns something else stops the run with one line naming it, on every rank
together (a failing rank that simply raised would leave the others waiting in TRL's next gather).
"""

import importlib
import importlib.util
import math
import numbers
import re
import sys
import threading
from pathlib import Path

from dstrain.distributed import any_rank
from dstrain.errors import UserError

BUILT_IN = ("exact_answer", "math_answer", "format", "length")
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
NEEDS_ANSWER = ("exact_answer", "math_answer")


def completion_text(completion) -> str:
    """A completion as TRL hands it: a string, or (conversational prompts) a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


# ---------------------------------------------------------------- built-in rewards


BOXED = re.compile(r"\\boxed\{")
ANSWER_LABEL = re.compile(r"answer\s*(?:is)?\s*[:=]", re.IGNORECASE)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced (a regex cannot match nested braces)."""
    starts = [match.end() for match in BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def final_answer(text: str) -> str:
    """What a reply gives as its answer: the last \\boxed{}, else the last <answer> tag, else the text after
    the last "answer:" / "answer is:", else all of it."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    labels = list(ANSWER_LABEL.finditer(text))
    return text[labels[-1].end():] if labels else text


def normalise(answer) -> str:
    return " ".join(str(answer).split()).casefold().rstrip(".").strip()


def exact_answer(completions, answer, **_) -> list[float]:
    return [float(normalise(final_answer(completion_text(c))) == normalise(gold))
            for c, gold in zip(completions, answer)]


def math_answer(completions, answer, **_) -> list[float]:
    from math_verify import parse, verify

    # math-verify bounds its SymPy work with signal.alarm, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    rewards = []
    for completion, gold in zip(completions, answer):
        gold_parsed = parse(str(gold), parsing_timeout=timeout)
        if not gold_parsed:  # a reference answer math-verify cannot read: compare it as text
            rewards.append(float(normalise(final_answer(completion_text(completion))) == normalise(gold)))
            continue
        guess = parse(final_answer(completion_text(completion)), parsing_timeout=timeout)
        rewards.append(float(bool(guess) and verify(gold_parsed, guess, timeout_seconds=timeout)))
    return rewards


def format_reward(pattern: str):
    regex = re.compile(pattern, re.DOTALL)

    def format(completions, **_) -> list[float]:  # noqa: A001 - the name TRL logs it under
        return [float(regex.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return format


def length_reward(max_completion_length: int):
    def length(completions, completion_ids, **_) -> list[float]:
        return [1.0 - min(len(ids), max_completion_length) / max_completion_length for ids in completion_ids]

    return length


# ---------------------------------------------------------------- finding each --reward_funcs entry


def user_function(spec: str):
    """`module:function` (importable from here) or `path/to/file.py:function`."""
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise UserError(f"--reward_funcs {spec}: expected one of {', '.join(BUILT_IN)}, module:function, "
                        "file.py:function or a reward model folder")
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise UserError(f"--reward_funcs {spec}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"dstrain_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # so that its pickling and dataclasses work
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the user's module is reported as one line
        raise UserError(f"--reward_funcs {spec}: cannot import {source}: {type(error).__name__}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--reward_funcs {spec}: {source} has no function {name}")
    return function


def load_reward_model(folder: str, trust_remote_code: bool = False):
    """(model, tokenizer) of a reward.py output folder: a one-score sequence classifier with a chat template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dstrain.data.chat_template import require_chat_template

    path = Path(folder)
    if (path / "adapter_config.json").exists():
        raise UserError(f"--reward_funcs {folder}: a LoRA adapter; merge it first (python export.py --adapter "
                        f"{folder} --output_dir {folder}-merged) and pass the merged folder")
    if not (path / "config.json").exists():
        raise UserError(f"--reward_funcs {folder}: not a model folder (no config.json)")
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1:
        raise UserError(f"--reward_funcs {folder}: a reward model has one score; this one has "
                        f"{model.config.num_labels} labels")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    require_chat_template(tokenizer, folder)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model.eval()
    return model, tokenizer


class Rewards:
    """The reward functions of a run, in --reward_funcs order, with the tokenizers of the reward models
    (None for functions), as GRPOTrainer takes them, and the check of what each returns."""

    def __init__(self, specs: list[str], max_completion_length: int, format_pattern: str = DEFAULT_FORMAT,
                 answer_field: str = "answer", trust_remote_code: bool = False):
        if not specs:
            raise UserError("--reward_funcs: give one or more rewards (built-in: " + ", ".join(BUILT_IN)
                            + "; or module:function, file.py:function, a reward model folder)")
        self.specs, self.answer_field = list(specs), answer_field
        self.failure: str | None = None
        self.funcs, self.processing_classes = [], []
        for spec in self.specs:
            func, tokenizer = self._resolve(spec, max_completion_length, format_pattern, trust_remote_code)
            self.funcs.append(func if tokenizer is not None else self._checked(func, spec))
            self.processing_classes.append(tokenizer)

    def _resolve(self, spec, max_completion_length, format_pattern, trust_remote_code):
        if spec in NEEDS_ANSWER:
            base = {"exact_answer": exact_answer, "math_answer": math_answer}[spec]
            field = self.answer_field

            def answer_reward(completions, **kwargs):
                return base(completions, kwargs[field])

            answer_reward.__name__ = spec
            return answer_reward, None
        if spec == "format":
            try:
                return format_reward(format_pattern), None
            except re.error as error:
                raise UserError(f"--format_pattern {format_pattern!r} is not a valid regex: {error}") from None
        if spec == "length":
            return length_reward(max_completion_length), None
        if Path(spec).is_dir():
            return load_reward_model(spec, trust_remote_code)
        return user_function(spec), None

    def _checked(self, func, spec: str):
        """`func` with its output checked; a failure is kept (and the completions get no reward) until
        `raise_if_failed`, which every rank reaches after TRL's gather of the rewards."""

        def checked(prompts, completions, **kwargs):
            try:
                values = func(prompts=prompts, completions=completions, **kwargs)
            except Exception as error:  # noqa: BLE001 - the user's function: reported, with its own message
                return self._fail(f"reward {spec} raised {type(error).__name__}: {error}", len(prompts))
            values, problem = as_numbers(values, len(prompts))
            if problem:
                return self._fail(f"reward {spec} {problem}", len(prompts))
            return values

        checked.__name__ = getattr(func, "__name__", spec)  # the name TRL logs rewards/<name>/mean under
        return checked

    def _fail(self, message: str, count: int) -> list:
        self.failure = self.failure or message
        return [None] * count

    def raise_if_failed(self) -> None:
        """Every rank calls this after each batch's rewards: if a function failed anywhere, all stop."""
        failure, self.failure = self.failure, None
        if any_rank(failure is not None):
            raise UserError(failure or "a reward function failed on another rank (that rank's error line names it)")

    def check_fields(self, columns: list[str]) -> None:
        """The built-in answer rewards need the answer field in every prompt record."""
        for spec in self.specs:
            if spec in NEEDS_ANSWER and self.answer_field not in columns:
                raise UserError(f"--reward_funcs {spec} compares with each record's '{self.answer_field}' field, "
                                f"which the prompt records lack (fields: {', '.join(sorted(columns))}); "
                                "add it or set --answer_field")


def as_numbers(values, count: int) -> tuple[list, str | None]:
    """A reward function's output for `count` completions as floats (None kept: not applicable), and what
    is wrong with it (None when nothing is). NumPy and one-element torch scalars count as numbers."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        return [], f"returned {type(values).__name__}, not a list of {count} numbers"
    if len(values) != count:
        return [], f"returned {len(values)} values for {count} completions (one number per completion)"
    numbers_ = []
    for i, value in enumerate(values):
        if value is not None and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()
        if value is None:
            numbers_.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return [], f"returned {type(value).__name__} {value!r} at position {i}, not a number"
        if not math.isfinite(float(value)):
            return [], f"returned {value} at position {i}, not a finite number"
        numbers_.append(float(value))
    return numbers_, None
