"""sft.py end to end: real 2-rank DeepSpeed runs (CPU ranks here) of chat SFT on a tiny model."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, assert_succeeded, run_deepspeed, run_script

STEPS = 12


def sft_run(base_model, chat_file, output_dir, stage: int, packing: bool):
    return run_deepspeed(
        "sft.py", "--deepspeed", REPO / f"ds_configs/zero{stage}.json", "--model_name_or_path", base_model,
        "--train_files", chat_file, "--max_length", "128", "--packing", str(packing).lower(),
        "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--warmup_ratio", "0.1",
        "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", str(STEPS), "--report_to", "none",
        "--validation_split_percentage", "5", "--output_dir", output_dir,
        "--data_cache_dir", output_dir.parent / "cache", "--gradient_checkpointing", "--seed", "3",
        "--drop_too_long", "true",
    )


CHAT_IN_A_FRESH_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": "What does str.upper() do?"}]
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:]
assert len(new) > 0
assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
print("REPLY", repr(tok.decode(new)))
"""


@pytest.mark.parametrize("stage, packing", [(3, True), (2, False)], ids=["zero3-packed", "zero2-padded"])
def test_two_rank_sft_learns_and_the_result_chats(tmp_path, base_model, chat_file, stage, packing):
    output_dir = tmp_path / "out"
    result = sft_run(base_model, chat_file, output_dir, stage, packing)
    assert_succeeded(result)
    shape = "packed rows of at most 128" if packing else "conversations"
    assert "Data: train" in result.stdout and shape in result.stdout

    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert (output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # a DeepSpeed checkpoint
    assert "eval_loss" in json.loads((output_dir / "eval_results.json").read_text())

    saved = json.loads((output_dir / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [4, 2]  # <|im_end|> ends a turn, </s> a document
    chat = subprocess.run([sys.executable, "-c", CHAT_IN_A_FRESH_PROCESS, str(output_dir)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "REPLY" in chat.stdout


def test_generate_chat_command_answers_one_turn(tmp_path, base_model):
    result = run_script("generate.py", "--model", base_model, "--chat", "What does str.upper() do?",
                        "--max_new_tokens", "5", "--temperature", "0")
    assert_succeeded(result)
    assert result.stdout.startswith("user: What does str.upper() do?\nassistant:")
