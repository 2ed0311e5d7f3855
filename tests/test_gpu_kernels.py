"""The fast kernels (dstrain/model/kernels.py): fused AdamW is the optimizer everywhere (checked here); flash
attention chosen by --attn_implementation auto, Liger's kernels and torch.compile on a real pretraining run
(GPU-gated: skipped on machines without one; a CPU torch.compile of even the tiny model took over 100 s on
2 cores, past what the suite can spend)."""

import json
from importlib.util import find_spec

import pytest
import torch

from dstrain.cli import parse_args
from pretrain import ARGUMENTS
from tests.helpers import assert_succeeded, logged_losses, run_deepspeed, train_flags

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def test_fused_adamw_is_the_optimizer(tmp_path):
    """transformers 5.23 on torch >= 2.8 defaults to torch's fused AdamW (one kernel over all parameters, GPU or
    CPU); our arguments keep that default, and DeepSpeed's ZeRO wraps the optimizer the Trainer builds."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    *_, args = parse_args(ARGUMENTS, ["--config_name", "tiny", "--tokenizer_name", str(tmp_path), "--train_files", "x",
                                      "--output_dir", str(tmp_path), "--report_to", "none"])
    assert args.optim == "adamw_torch_fused"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2))
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["fused"] is True


@needs_gpu
def test_auto_takes_flash_attention_where_the_gpu_and_package_allow():
    from dstrain.model.kernels import choose_attention

    chosen, line = choose_attention("auto")
    if torch.cuda.get_device_capability() >= (8, 0) and find_spec("flash_attn") is not None:
        assert chosen in ("flash_attention_2", "flash_attention_3"), line
    else:
        assert chosen is None and line.startswith("Attention: sdpa"), line


@pytest.mark.slow
@needs_gpu
@pytest.mark.skipif(find_spec("liger_kernel") is None, reason="needs liger-kernel (pip install -e '.[gpu]')")
def test_liger_compile_and_document_mask_train_a_real_run_on_one_gpu(tmp_path, tokenizer_dir, docs_corpus):
    output_dir = tmp_path / "out"
    result = run_deepspeed("pretrain.py", "--deepspeed", "ds_configs/zero2.json",
                           *train_flags(tokenizer_dir, docs_corpus, output_dir, tmp_path / "cache", max_steps=4,
                                        save_steps=4, validation_split_percentage=0),
                           "--bf16", "--use_liger_kernel", "true", "--torch_compile", "true", "--document_mask", "true",
                           ranks=1)
    assert_succeeded(result)
    assert "Attention: " in result.stdout
    assert sorted(logged_losses(output_dir)) == [1, 2, 3, 4]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert all(0 < e["mfu"] <= e["hfu"] < 1 for e in history if "loss" in e)  # the GPU's peak is in the table
