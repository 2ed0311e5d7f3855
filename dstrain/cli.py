"""How every entry script meets the user: its arguments (a JSON run config and/or flags, parsed by
HfArgumentParser into the script's dataclasses) and its errors (one line, exit code 2, no traceback).

    deepspeed pretrain.py configs/pretrain_tiny.json --learning_rate 1e-3    # flags after the file win

A JSON config's values become the parser's defaults (argparse's `set_defaults`), so the flags after
it override them and both go through the same parser: its types, its choices, its unknown-name
check. Parsing is separate from building the dataclasses (`parse_namespace`), so the launch
pre-flight and audit.py read a training run's own arguments with its own parser, without building
TrainingArguments (which sets up devices).
"""

import argparse
import dataclasses
import functools
import json
import runpy
import sys
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from dstrain.distributed import copy_output_to_rank_log, finish, print0
from dstrain.errors import PREEMPTED_EXIT_CODE, Preempted, UserError


def cli_entry(main):
    """Wrap an entry script's `main` so that a UserError ends the process with one clear line.

    Every rank reports its own error (other ranks print nothing *but* errors); the DeepSpeed
    launcher then stops the remaining ranks. A preempted run (dstrain/train/preemption.py) says why
    on rank 0 and exits with code 75; when every rank stopped together after its checkpoint they
    leave the process group together first, so no rank exits while rank 0 still writes.
    Where the launch/ scripts ask for it, each rank's output is also copied into its own log file,
    from the first line on.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        copy_output_to_rank_log()
        try:
            return main(*args, **kwargs)
        except UserError as error:
            close_progress_bars()
            message = " ".join(str(error).split("\n"))
            # One write, so the lines of ranks failing at the same moment do not run into each other.
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            sys.exit(2)
        except Preempted as stop:
            print0(f"Preempted: {stop}")
            if stop.orderly:
                finish()
            sys.exit(PREEMPTED_EXIT_CODE)

    return wrapper


def close_progress_bars() -> None:
    """End the progress bar of a run stopped mid-training (HF's closes only when training ends), so the
    error starts a line of its own instead of trailing the bar."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """A script's arguments as given: a JSON run config's values (if the first argument names one)
    and the flags after it."""

    flags: list[str]
    config: dict = dataclasses.field(default_factory=dict)
    config_path: str | None = None

    @classmethod
    def read(cls, argv: list[str] | None = None) -> "CommandLine":
        argv = list(sys.argv[1:] if argv is None else argv)
        # The deepspeed launcher puts --local_rank=N before the user's arguments.
        launcher = [arg for arg in argv[:1] if arg.startswith("--local_rank=")]
        rest = argv[len(launcher):]
        if not (rest and rest[0].endswith(".json")):
            return cls(argv)
        return cls(launcher + rest[1:], read_run_config(rest[0]), rest[0])


def read_run_config(path: str) -> dict:
    """A JSON object of arguments; keys starting with `_` are comments (configs explain their arithmetic)."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of arguments")
    return {key: value for key, value in values.items() if not key.startswith("_")}


def parse_known(dataclass_types, command: CommandLine) -> tuple[argparse.Namespace, dict, list[str]]:
    """The values `dataclass_types`' parser gives `command`, plus the config keys and flags it does not know."""
    # No abbreviations: a mistyped flag such as --learning_rat must fail, not match a longer one.
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown_keys = {key: value for key, value in command.config.items() if key not in actions}
    defaults = {}
    for key, value in command.config.items():
        if key in unknown_keys:
            continue
        action = actions[key]
        defaults[key] = _as_default(action, value)
        action.required = False  # given by the config
    parser.set_defaults(**defaults)
    try:
        namespace, unknown_flags = parser.parse_known_args(command.flags)
    except argparse.ArgumentError as error:  # argparse exits by itself for most errors; this is the rest
        raise UserError(str(error)) from None
    for key in defaults:  # argparse checks choices for flags only, not for defaults
        choices, value = actions[key].choices, getattr(namespace, key)
        if choices is not None and key not in _given_as_flags(command.flags) and value not in choices:
            raise UserError(f"{command.config_path}: {key} must be one of {', '.join(map(str, choices))}, "
                            f"got {value!r}")
    return namespace, unknown_keys, unknown_flags


def _as_default(action: argparse.Action, value):
    """A config value as the flag would give it: argparse converts a string default with the
    flag's type (so `"bf16": true` and `--bf16 true` are the same), but never a list's items."""
    if isinstance(value, dict) or (isinstance(value, list) and action.nargs not in ("+", "*")):
        return value  # an inline DeepSpeed config, a report_to list: TrainingArguments takes them as they are
    as_text = lambda item: str(item).lower() if isinstance(item, bool) else str(item)  # noqa: E731
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]  # "train_files": "a.jsonl" is one file
        return [action.type(as_text(item)) if action.type else as_text(item) for item in items]
    return as_text(value)


def _given_as_flags(flags: list[str]) -> set[str]:
    return {flag[2:].split("=", 1)[0] for flag in flags if flag.startswith("--")}


def refuse_unknown(command: CommandLine, unknown_keys: dict, unknown_flags: list[str]) -> None:
    if unknown_keys:
        raise UserError(f"{command.config_path}: unknown argument '{next(iter(unknown_keys))}' "
                        "(keys starting with _ are comments)")
    if unknown_flags:
        # The words HfArgumentParser itself uses for them.
        raise UserError(f"Some specified arguments are not used by the HfArgumentParser: {unknown_flags}")


def parse_namespace(dataclass_types, argv: list[str] | None = None) -> argparse.Namespace:
    """Every argument of `dataclass_types` as parsed, no dataclass built (no `__post_init__` runs)."""
    command = CommandLine.read(argv)
    namespace, unknown_keys, unknown_flags = parse_known(dataclass_types, command)
    refuse_unknown(command, unknown_keys, unknown_flags)
    return namespace


def build(dataclass_type, namespace: argparse.Namespace):
    """One argument dataclass from parsed values (what HfArgumentParser.parse_args_into_dataclasses does)."""
    names = {field.name for field in dataclasses.fields(dataclass_type) if field.init}
    return dataclass_type(**{name: value for name, value in vars(namespace).items() if name in names})


def parse_args(dataclass_types, argv: list[str] | None = None) -> tuple:
    """The script's argument dataclasses from a JSON config (if the first argument is one) and flags."""
    namespace = parse_namespace(dataclass_types, argv)
    return tuple(build(dataclass_type, namespace) for dataclass_type in dataclass_types)


def script_arguments(entry: str | Path) -> tuple:
    """The argument dataclasses an entry script parses (its ARGUMENTS), read without running it."""
    return runpy.run_path(str(entry), run_name="__dstrain_arguments__").get("ARGUMENTS", ())
