"""--document_mask (dstrain/data/blocks.py DocumentBlocksCollator): inside a pretraining block, attention never
crosses a document boundary, so a block's loss is its documents' losses computed one by one; and
--attn_implementation auto says which kernel it took (sdpa here, without a GPU). The one in-process run is
also read by bench/gpu_table.py, and bench/gpu.sh refuses this GPU-less machine in one line."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dstrain.data.blocks import DocumentBlocksCollator, block_collator
from dstrain.errors import UserError
from dstrain.model.kernels import check_liger, choose_attention
from tests.helpers import REPO, assert_succeeded, run_main_in_process, train_flags

# bench/ holds scripts, not a package: load the table's module from its file.
_spec = importlib.util.spec_from_file_location("gpu_table", REPO / "bench" / "gpu_table.py")
gpu_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_table)

EOS = 1
# Two blocks of 12: a document's tail, then whole documents, each ending with eos (as the token stores hold them).
BLOCKS = [[7, 8, 9, EOS, 20, 21, 22, 23, EOS, 30, 31, 32], [40, 41, EOS, 50, 51, 52, 53, 54, 55, EOS, 60, 61]]


def documents(block):
    parts, start = [], 0
    for i, token in enumerate(block):
        if token == EOS or i == len(block) - 1:
            parts.append(block[start:i + 1])
            start = i + 1
    return parts


def test_positions_restart_after_each_eos_and_document_starts_are_not_targets():
    batch = DocumentBlocksCollator(EOS)([{"input_ids": np.array(b)} for b in BLOCKS])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]]
    assert batch["labels"][0].tolist() == [-100, 8, 9, EOS, -100, 21, 22, 23, EOS, -100, 31, 32]
    assert batch["use_cache"] is False
    flat = DocumentBlocksCollator(EOS, flatten=True)([{"input_ids": np.array(b)} for b in BLOCKS])
    assert flat["input_ids"].shape == (1, 24) and flat["position_ids"][0, 12:].tolist() == batch["position_ids"][1].tolist()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_a_blocks_loss_equals_its_documents_losses_computed_apart(attention, flatten):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, eos_token_id=EOS, pad_token_id=0,
                                         initializer_range=0.5, attn_implementation=attention)).eval()
    batch = DocumentBlocksCollator(EOS, flatten=flatten)([{"input_ids": np.array(b)} for b in BLOCKS])
    with torch.no_grad():
        block_loss = model(**batch).loss
        total, targets = 0.0, 0
        for block in BLOCKS:
            for doc in documents(block):
                if len(doc) < 2:
                    continue
                ids = torch.tensor([doc])
                total += model(input_ids=ids, labels=ids).loss * (len(doc) - 1)
                targets += len(doc) - 1
        # Without the document mask (plain blocks), the later documents see the earlier ones: another loss.
        plain = block_collator([{"input_ids": np.array(b)} for b in BLOCKS])
        crossing = model(input_ids=plain["input_ids"], labels=batch["labels"].reshape(2, -1)).loss
    assert block_loss.item() == pytest.approx((total / targets).item(), rel=1e-5)
    assert abs(crossing.item() - block_loss.item()) > 0.01 * block_loss.item()


def test_attention_auto_says_sdpa_without_a_gpu_and_flash_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: see test_gpu_kernels.py")
    assert choose_attention("auto") == (None, "Attention: sdpa (--attn_implementation auto: no GPU)")
    assert choose_attention("eager")[0] == "eager"
    with pytest.raises(UserError, match=r"--attn_implementation flash_attention_2 needs an Ampere .* \(no GPU here"):
        choose_attention("flash_attention_2")
    with pytest.raises(UserError, match="--use_liger_kernel needs a GPU"):
        check_liger(True)
    check_liger(False)


def test_pretrain_with_document_mask_trains_and_says_which_attention(tmp_path, tokenizer_dir):
    """pretrain.py --document_mask true, in this process, on short documents: the run says which kernel auto
    chose, and fewer tokens are trained than a plain block's L-1 per row (each document's first token is no target)."""
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The value of x is {i}, and the list holds {i % 7} items."}) + "\n"
                              for i in range(300)))
    output_dir = tmp_path / "out"
    result = run_main_in_process("pretrain.py", *train_flags(tokenizer_dir, corpus, output_dir, tmp_path / "cache",
                                                             max_steps=1, save_steps=5, validation_split_percentage=0),
                                 "--document_mask", "true")
    assert_succeeded(result)
    assert "Attention: sdpa (--attn_implementation auto: no GPU)" in result.stdout
    [entry] = [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    rows, block = 4 * 2, 64  # train_flags: batch 4, accumulation 2, blocks of 64
    assert entry["tokens_seen"] == rows * block
    assert entry["trained_tokens_per_second"] < entry["tokens_per_second"] * (block - 1) / block
    # bench/gpu.sh's table reads the same run the way it reads its GPU runs (bench/gpu_table.py).
    run = tmp_path / "work" / "runs" / "tiny-ours"
    run.mkdir(parents=True)
    (run / "meta.json").write_text(json.dumps({"preset": "tiny", "zero": 0, "attention": "sdpa", "liger": "false",
                                               "compile": "false", "script": "ours"}))
    (run / "trainer_state.json").write_text((output_dir / "trainer_state.json").read_text())
    row = gpu_table.summarize(run)
    assert row["tokens_per_second"] == entry["tokens_per_second"] and row["mfu"] is None  # no peak on CPU
    assert row["peak_memory_gb"] == entry["peak_memory_gb"]
    assert "tiny" in gpu_table.table([row]).splitlines()[2]


def test_the_gpu_benchmark_refuses_a_machine_without_a_gpu_and_lists_its_runs_dry():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, PYTHON=sys.executable)
    refused = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: bench/gpu.sh needs a CUDA GPU ({sys.executable}'s torch sees none here); bench/train_throughput.py "
        "is the CPU benchmark"]
    dry = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env | {"DRY_RUN": "1", "WORK": str(REPO / "no-such")},
                         capture_output=True, text=True)
    launches = [line for line in dry.stdout.splitlines() if line.startswith("+ deepspeed")]
    assert dry.returncode == 0 and len(launches) == 2 * 2 * 7  # presets x ZeRO stages x variants
    assert sum("--attn_implementation flash_attention_2" in line for line in launches) == 2 * 2 * 3
    assert not (REPO / "no-such").exists()
