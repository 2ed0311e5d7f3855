"""sft.py end to end: real 2-rank DeepSpeed runs (CPU ranks here) of chat SFT on a tiny model."""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import (
    REPO,
    assert_same_losses,
    assert_succeeded,
    kill_and_resume,
    run_deepspeed,
    run_main_in_process,
)

STEPS = 12


def sft_flags(base_model, chat_file, output_dir, stage: int, packing: bool, save_steps: int = STEPS) -> list:
    return [
        "--deepspeed", REPO / f"ds_configs/zero{stage}.json", "--model_name_or_path", base_model,
        "--train_files", chat_file, "--max_length", "128", "--packing", str(packing).lower(),
        "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--warmup_ratio", "0.1",
        "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", str(save_steps), "--report_to", "none",
        "--validation_split_percentage", "5", "--output_dir", output_dir,
        "--data_cache_dir", output_dir.parent.parent / "cache", "--gradient_checkpointing", "--seed", "3",
        "--drop_too_long", "true",
    ]


@pytest.fixture(scope="module", params=[(3, True), (2, False)], ids=["zero3-packed", "zero2-padded"])
def sft_run(request, tmp_path_factory, base_model, chat_file):
    stage, packing = request.param
    output_dir = tmp_path_factory.mktemp(f"sft-{request.param_index}") / "full" / "out"
    result = run_deepspeed("sft.py", *sft_flags(base_model, chat_file, output_dir, stage, packing))
    assert_succeeded(result)
    return output_dir, result, stage, packing


QUESTION = "What does str.upper() do?"
# Plain transformers, no dstrain: the saved folder must chat for anyone who loads it.
CHAT_IN_A_FRESH_PROCESS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": sys.argv[2]}]
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({"ids": new, "text": tok.decode(new, skip_special_tokens=True),
                  "stops": model.generation_config.eos_token_id}))
"""
DATA_LINE = re.compile(r"Data: (train|validation) ([\d,]+) (packed rows of at most 128|conversations), "
                       r"([\d,]+) tokens, ([\d,]+) of them trained")


def number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.slow
def test_two_rank_sft_learns_and_the_result_chats(tmp_path, sft_run):
    output_dir, result, stage, packing = sft_run
    # What the run says it will train: every kept conversation in one split or the other, packed into
    # fewer rows when packing, and only part of each row's tokens trained (the assistant replies).
    kept = number(re.search(r"Conversations: ([\d,]+) kept", result.stdout).group(1))
    splits = {name: (number(rows), shape, number(tokens), number(trained))
              for name, rows, shape, tokens, trained in DATA_LINE.findall(result.stdout)}
    assert set(splits) == {"train", "validation"}, result.stdout[-3000:]
    rows = sum(count for count, _, _, _ in splits.values())
    assert rows < kept if packing else rows == kept
    assert {shape for _, shape, _, _ in splits.values()} == {"packed rows of at most 128" if packing else "conversations"}
    assert all(0 < trained < tokens for _, _, tokens, trained in splits.values())

    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert (output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # a DeepSpeed checkpoint
    assert "eval_loss" in json.loads((output_dir / "eval_results.json").read_text())

    saved = json.loads((output_dir / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [4, 2]  # <|im_end|> ends a turn, </s> a document
    chat = subprocess.run([sys.executable, "-c", CHAT_IN_A_FRESH_PROCESS, str(output_dir), QUESTION],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    reply = json.loads(chat.stdout.splitlines()[-1])
    assert reply["stops"] == [4, 2] and reply["ids"]
    # generate.py's chat path (our template rendering, stop tokens and decoding) gives the same reply.
    ours = run_main_in_process("generate.py", "--model", output_dir, "--chat", QUESTION, "--max_new_tokens", "12",
                               "--temperature", "0")
    assert_succeeded(ours)
    assert ours.stdout == f"user: {QUESTION}\nassistant: {reply['text'].strip()}\n"


@pytest.mark.slow
def test_packed_sft_killed_mid_run_resumes_with_the_uninterrupted_losses(sft_run, base_model, chat_file):
    """ZeRO-3, packed rows: rank 1 SIGKILLed after step 7, the same command resumes from checkpoint-4."""
    full_dir, _, stage, packing = sft_run
    if not packing:
        pytest.skip("resume is checked once, on the packed ZeRO-3 run")
    chain_dir = full_dir.parent.parent / "chain" / "out"
    _, resumed = kill_and_resume("sft.py", *sft_flags(base_model, chat_file, chain_dir, stage, packing, save_steps=4),
                                 kill_after=7)
    assert f"Resuming from {chain_dir / 'checkpoint-4'}\n" in resumed.stdout
    assert_same_losses(full_dir, chain_dir, STEPS)


def test_generate_chat_command_answers_one_turn(tmp_path, base_model):
    """The reply is the model's own greedy continuation of the chat-rendered question, ended at the
    end of a turn (<|im_end|>, 4) or eos, as transformers computes it directly."""
    result = run_main_in_process("generate.py", "--model", base_model, "--chat", QUESTION, "--max_new_tokens", "5",
                                 "--temperature", "0")
    assert_succeeded(result)
    tokenizer, model = AutoTokenizer.from_pretrained(base_model), AutoModelForCausalLM.from_pretrained(base_model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=[4, 2])
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert result.stdout == f"user: {QUESTION}\nassistant: {expected}\n"
