"""Every run config and DeepSpeed config the repo ships parses into the arguments it promises."""

import json

import pytest

from dstrain.cli import parse_args, script_arguments
from tests.helpers import REPO

RUN_CONFIGS = sorted((REPO / "configs").glob("*.json"))
SCRIPTS = {  # by the config's name prefix: the script that reads it (its ARGUMENTS are what it parses)
    "pretrain": "pretrain.py", "sft": "sft.py", "full": "sft.py", "lora": "lora.py", "qlora": "lora.py",
    "reward": "reward.py", "dpo": "dpo.py", "grpo": "grpo.py", "multimodal": "sft.py",
}
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_parses_and_flags_override_it(config, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name paths relative to the repository, as users run them
    written = json.loads(config.read_text())
    # bf16 needs a GPU; the flag after the file turns it off, which is itself the override under test.
    parsed = parse_args(script_arguments(REPO / SCRIPTS[config.name.split("_")[0]]),
                        [str(config.relative_to(REPO)), "--seed", "123", "--bf16", "false"])
    model_args, data_args, training_args = parsed[0], parsed[1], parsed[-1]
    assert training_args.seed == 123 and not training_args.bf16
    assert training_args.learning_rate == written["learning_rate"]
    assert data_args.train_files == written["train_files"]
    assert model_args.config_name == written.get("config_name")
    assert model_args.model_name_or_path == written.get("model_name_or_path")
    assert training_args.warmup_steps == written["warmup_ratio"]
    assert training_args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == \
        written["per_device_train_batch_size"]  # "auto" filled from the flags


@pytest.mark.parametrize("config", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_leaves_batch_and_precision_to_the_flags(config):
    values = json.loads(config.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert values[key] == "auto", key
    assert values["bf16"]["enabled"] == "auto"
    stage = values["zero_optimization"]["stage"]
    assert stage in (2, 3)
    if stage == 3:  # without it the final save writes only shards that from_pretrained cannot load
        assert values["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_offload_config_offloads_optimizer_and_parameters():
    offload = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu"
    assert offload["offload_param"]["device"] == "cpu"
