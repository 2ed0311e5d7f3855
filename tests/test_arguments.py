"""utils/arguments.parse_args: a JSON run config followed by flags, parsed into the scripts'
dataclasses, with the compatibility names and the early DeepSpeed-config check."""

import json
from pathlib import Path

import pytest

from dstrain.arguments import DataArguments, ModelArguments, TrainingArguments
from dstrain.cli import parse_args
from dstrain.errors import UserError
from dstrain.train.run import start_run

DATACLASSES = (ModelArguments, DataArguments, TrainingArguments)


def write_json(path: Path, values: dict) -> str:
    path.write_text(json.dumps(values))
    return str(path)


@pytest.fixture()
def run_config(tmp_path) -> str:
    """A run config as the repo's configs/ write them: arguments plus `_comment` notes."""
    return write_json(tmp_path / "run.json", {
        "_comment": "2 x 4 x 2 ranks = 16 sequences per step",
        "tokenizer_name": "tok", "config_name": "tiny", "train_files": ["a.jsonl", "b.jsonl"],
        "learning_rate": 1e-3, "per_device_train_batch_size": 4, "logging_steps": 5, "bf16": False,
        "output_dir": str(tmp_path / "out"), "report_to": "none",
        "_comment_lr": "halve this for bigger models",
    })


def parse(*argv):
    return parse_args(DATACLASSES, [str(arg) for arg in argv])


def test_flags_after_the_json_config_win(run_config):
    """Values come from the JSON file; a flag given after it replaces its value (lists included)."""
    model, data, training = parse(run_config, "--learning_rate", "5e-4", "--train_files", "c.jsonl")
    assert training.learning_rate == 5e-4
    assert data.train_files == ["c.jsonl"]
    assert (training.per_device_train_batch_size, training.logging_steps, training.bf16) == (4, 5, False)
    assert (model.config_name, model.tokenizer_name) == ("tiny", "tok")


def test_underscore_keys_are_notes_but_unknown_keys_are_errors(tmp_path, run_config):
    """`_comment` keys are skipped (the config above parses), while a real unknown key is refused."""
    parse(run_config)
    values = json.loads(Path(run_config).read_text()) | {"lerning_rate": 1e-3}
    with pytest.raises(UserError, match="lerning_rate"):
        parse(write_json(tmp_path / "typo.json", values))


def test_warmup_ratio_becomes_fractional_warmup_steps(run_config):
    """--warmup_ratio 0.1 (dropped by transformers 5) is kept as warmup_steps 0.1, read as a ratio."""
    _, _, training = parse(run_config, "--warmup_ratio", "0.1")
    assert training.warmup_steps == 0.1
    with pytest.raises(UserError, match=r"--warmup_ratio must be in \[0, 1\)"):
        parse(run_config, "--warmup_ratio", "1.5")


def test_gradient_checkpointing_sets_activation_checkpointing(run_config):
    """The old --gradient_checkpointing flag turns on activation_checkpointing; it is off without it."""
    assert parse(run_config, "--gradient_checkpointing")[2].activation_checkpointing is True
    assert not parse(run_config)[2].activation_checkpointing


def test_deepspeed_config_contradicting_flags_is_refused(tmp_path, run_config):
    """A DeepSpeed JSON whose micro batch (4) contradicts --per_device_train_batch_size (8) stops the
    run at its start with a UserError naming the file and both values; "auto" values agree with anything."""
    clash = write_json(tmp_path / "ds_clash.json",
                       {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
    with pytest.raises(UserError) as caught:
        start_run(parse(run_config, "--per_device_train_batch_size", "8", "--deepspeed", clash)[2])
    message = str(caught.value)
    assert clash in message
    assert "train_micro_batch_size_per_gpu=4" in message and "per_device_train_batch_size=8" in message

    auto = write_json(tmp_path / "ds_auto.json",
                      {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}})
    assert start_run(parse(run_config, "--per_device_train_batch_size", "8", "--deepspeed", auto)[2]).args.deepspeed == auto


@pytest.mark.parametrize("content, fragment", [
    (None, "config file not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_config_file_is_a_user_error(tmp_path, content, fragment):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        parse(path)
