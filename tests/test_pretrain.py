"""pretrain.py end to end: real `deepspeed --num_gpus 2` runs (CPU ranks here) on a tiny model."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import PRETRAIN_SAVE_EVERY, PRETRAIN_STEPS, logged_losses

STEPS, SAVE_EVERY = PRETRAIN_STEPS, PRETRAIN_SAVE_EVERY


def assert_loss_falls(output_dir: Path) -> None:
    losses = logged_losses(output_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = losses[1], sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < first - 0.3, f"loss did not fall: {losses}"


def assert_deepspeed_checkpoint(checkpoint: Path, step: int) -> None:
    assert (checkpoint / "latest").read_text().strip() == f"global_step{step}"
    # One optimizer-state shard per rank is what makes it a ZeRO checkpoint.
    shards = sorted(p.name for p in (checkpoint / f"global_step{step}").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    assert (checkpoint / "zero_to_fp32.py").is_file()
    assert (checkpoint / "trainer_state.json").is_file()


def assert_loads_and_generates(model_dir: Path) -> None:
    """A fresh interpreter, with nothing of this project imported, loads the folder and generates."""
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok('The for statement', return_tensors='pt', add_special_tokens=False)\n"
        "out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)\n"
        "assert out.shape[1] == ids['input_ids'].shape[1] + 8, out.shape\n"
        "print('GENERATED', repr(tok.decode(out[0])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True,
                            cwd=model_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GENERATED 'The for statement" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero2_run", "zero3_run"])
def test_two_rank_run_learns_checkpoints_and_saves_a_plain_hf_model(run, request):
    output_dir, result = request.getfixturevalue(run)
    assert_loss_falls(output_dir)
    for step in (SAVE_EVERY, STEPS):
        assert_deepspeed_checkpoint(output_dir / f"checkpoint-{step}", step)
    assert (output_dir / "model.safetensors").is_file()  # gathered, also from ZeRO-3 shards
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert eval_results["perplexity"] == pytest.approx(torch.tensor(eval_results["eval_loss"]).exp().item(), rel=1e-4)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert_loads_and_generates(output_dir)


@pytest.mark.slow
def test_both_ranks_took_part(zero2_run):
    """2 ranks * 4 sequences * 2 accumulation = 16 blocks per step: the epoch count proves the world size."""
    output_dir, result = zero2_run
    train_blocks = int(re.search(r"Data: train ([\d,]+) blocks", result.stdout).group(1).replace(",", ""))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(STEPS * 16 / train_blocks, rel=0.05)
    assert "Initialised a new llama model" in result.stdout


@pytest.mark.slow
def test_zero3_checkpoint_reconstructs_the_saved_weights(zero3_run):
    """DeepSpeed's own zero_to_fp32 tool rebuilds, from the sharded checkpoint, the weights the final save gathered."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    output_dir, _ = zero3_run
    rebuilt = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / f"checkpoint-{STEPS}"))
    saved = load_file(output_dir / "model.safetensors")
    assert set(saved) <= set(rebuilt)
    for name, tensor in saved.items():
        torch.testing.assert_close(rebuilt[name], tensor.float(), msg=name)


# Resume after a crash (same steps, same data order, same losses): tests/test_fault_injection.py.

