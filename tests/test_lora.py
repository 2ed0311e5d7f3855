"""lora.py and export.py: real 2-rank LoRA runs (CPU ranks here), adapters, merging, QLoRA's refusal."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_same_losses,
    assert_succeeded,
    kill_and_resume,
    run_deepspeed,
    run_main_in_process,
    run_script,
)

STEPS = 12


def lora_flags(base_model, train_file, output_dir, **overrides) -> list[str]:
    flags = {
        "model_name_or_path": base_model, "train_files": train_file, "validation_files": train_file,
        "max_length": 128, "block_size": 64, "per_device_train_batch_size": 2, "learning_rate": 5e-2,
        "max_steps": STEPS, "logging_steps": 1, "save_steps": STEPS // 2, "report_to": "none",
        "eval_strategy": "steps", "eval_steps": STEPS // 2, "eval_on_start": "true",
        "output_dir": output_dir, "data_cache_dir": output_dir.parent / "cache", "seed": 5,
        "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "drop_too_long": "true",
    } | overrides
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory, chat_file, docs_corpus) -> dict[str, Path]:
    """A dozen conversations and four documentation topics: sets a LoRA can visibly fit in 12 steps."""
    folder = tmp_path_factory.mktemp("small")
    sets = {"sft": folder / "chat.jsonl", "pretrain": folder / "text.jsonl"}
    sets["sft"].write_text("".join(chat_file.read_text().splitlines(keepends=True)[:12]))
    sets["pretrain"].write_text("".join(docs_corpus.read_text().splitlines(keepends=True)[30:34]))
    return sets


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=[
    ("zero2", "sft", "q_proj,v_proj"),
    ("zero3", "pretrain", "all-linear"),
], ids=["zero2-chat-q_v", "zero3-text-all_linear"])
def lora_run(request, tmp_path_factory, base_model, small_sets):
    stage_config, stage, targets = request.param
    output_dir = tmp_path_factory.mktemp(f"lora-{stage_config}") / "adapter"
    base_weights = sha256(base_model / "model.safetensors")
    result = run_deepspeed("lora.py", "--deepspeed", REPO / f"ds_configs/{stage_config}.json",
                           *lora_flags(base_model, small_sets[stage], output_dir, stage=stage,
                                       lora_target_modules=targets),
                           "--gradient_checkpointing")
    assert_succeeded(result)
    assert sha256(base_model / "model.safetensors") == base_weights  # the base model on disk is untouched
    return output_dir, result, request.param


@pytest.mark.slow
def test_loss_falls_and_only_adapters_train(lora_run):
    """Loss on a fixed held-out pass falls at every evaluation (the base here is a random tiny model
    whose frozen 0.02-scale embeddings bound how fast any adapter can move its logits)."""
    output_dir, result, _ = lora_run
    counts = re.search(r"LoRA r=8 alpha=32: ([\d,]+) trainable of ([\d,]+) parameters", result.stdout)
    trainable, total = (int(n.replace(",", "")) for n in counts.groups())
    assert 0 < trainable < total / 5
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert len([entry for entry in history if "loss" in entry]) == STEPS
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(evals) >= 3 and all(later < earlier for earlier, later in zip(evals, evals[1:])), evals
    assert evals[-1] < evals[0] - 0.05, evals


@pytest.mark.slow
def test_output_is_a_standard_peft_adapter_with_the_tokenizer(lora_run):
    from safetensors.torch import load_file

    output_dir, _, _ = lora_run
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    weights = load_file(output_dir / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())
    assert (output_dir / "tokenizer_config.json").is_file()
    assert (output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # a DeepSpeed checkpoint


ADAPTER_VS_MERGED = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, merged_dir = sys.argv[1:]
base = AutoModelForCausalLM.from_pretrained(base_dir)
original = {name: p.detach().clone() for name, p in base.named_parameters()}
wrapped = PeftModel.from_pretrained(base, adapter_dir).eval()
# Only adapter weights differ from the base: every base parameter inside the wrapper is unchanged.
for name, p in wrapped.base_model.model.named_parameters():
    if "lora_" not in name:
        key = name.replace(".base_layer", "")
        assert torch.equal(p, original[key]), name
ids = torch.arange(5, 45).view(2, 20)
with torch.no_grad():
    adapted = wrapped(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)(input_ids=ids).logits
assert not torch.allclose(adapted, plain, atol=1e-4), "the adapter changed nothing"
torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
print("MATCH", (merged - adapted).abs().max().item())
"""


@pytest.mark.slow
def test_adapter_loads_in_a_fresh_process_and_merges_to_the_same_logits(lora_run, base_model, tmp_path):
    output_dir, _, _ = lora_run
    merged = tmp_path / "merged"
    assert_succeeded(run_script("export.py", "--adapter", output_dir, "--output_dir", merged))
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    check = subprocess.run([sys.executable, "-c", ADAPTER_VS_MERGED, str(base_model), str(output_dir), str(merged)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "MATCH" in check.stdout


@pytest.mark.slow
def test_lora_run_killed_mid_run_resumes_with_the_uninterrupted_losses(lora_run, tmp_path, base_model, small_sets):
    """Rank 1 SIGKILLed after step 8; the same command resumes from checkpoint-6 (adapter weights, optimizer,
    data order) and logs the uninterrupted run's losses."""
    full_dir, _, (stage_config, stage, targets) = lora_run
    if stage_config != "zero2":
        pytest.skip("resume is checked once, on the ZeRO-2 run")
    chain_dir = tmp_path / "adapter"
    _, resumed = kill_and_resume("lora.py", "--deepspeed", REPO / f"ds_configs/{stage_config}.json",
                                 *lora_flags(base_model, small_sets[stage], chain_dir, stage=stage,
                                             lora_target_modules=targets, data_cache_dir=full_dir.parent / "cache"),
                                 "--gradient_checkpointing", kill_after=STEPS // 2 + 2)
    assert f"Resuming from {chain_dir / f'checkpoint-{STEPS // 2}'}\n" in resumed.stdout
    assert_same_losses(full_dir, chain_dir, STEPS)


def test_unknown_target_module_lists_the_linear_layers(tmp_path, base_model, chat_file):
    result = run_main_in_process("lora.py", *lora_flags(base_model, chat_file, tmp_path / "out",
                                                        lora_target_modules="q_proj,query_key_value"),
                                 "--validation_split_percentage", "0")
    message = assert_clean_error(result, "query_key_value")
    for layer in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert layer in message
    assert "lm_head" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_qlora_without_a_gpu_is_refused_in_one_line(tmp_path, base_model, chat_file):
    result = run_main_in_process("lora.py", *lora_flags(base_model, chat_file, tmp_path / "out",
                                                        quantization_bit=4))
    assert_clean_error(result, "--quantization_bit 4", "needs a CUDA GPU")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA's 4-bit kernels need a CUDA GPU")
def test_qlora_trains_on_a_gpu(tmp_path, base_model, chat_file):
    output_dir = tmp_path / "qlora"
    result = run_script("lora.py", *lora_flags(base_model, chat_file, output_dir, quantization_bit=4,
                                               max_steps=4), "--bf16")
    assert_succeeded(result)
    assert (output_dir / "adapter_model.safetensors").is_file()
