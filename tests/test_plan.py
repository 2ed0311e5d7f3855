"""plan.py (dstrain/train/plan.py): the model's size counted by hand, the per-GPU model states against
DeepSpeed's own estimators, speed and time against hand arithmetic, and the command's output."""

import pytest

from dstrain.train.plan import (
    GPUS,
    ModelSize,
    deepspeed_estimate,
    flops_per_token,
    make_plan,
    model_size,
    model_state_bytes,
)
from plan import PlanArguments, model_config
from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process

# llama-1b by hand: per layer q and o 2048^2 each, k and v 2048 x (4 KV heads x 64), SwiGLU 3 x 2048 x 5632,
# two RMSNorms; then the (tied) embedding 32,000 x 2048 and the final norm.
LAYER_1B = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
PARAMETERS_1B = 22 * LAYER_1B + 32000 * 2048 + 2048


@pytest.fixture(scope="module")
def size_1b() -> ModelSize:
    return model_size(model_config(PlanArguments(config_name="llama-1b", vocab_size=32000)))


def test_the_1b_preset_is_counted_exactly(size_1b):
    assert size_1b.parameters == PARAMETERS_1B == 1_034_512_384
    assert size_1b.largest_layer == 32000 * 2048  # the embedding; ZeRO-3 gathers it whole
    assert size_1b.matmul_parameters == PARAMETERS_1B  # tied: the embedding is the output layer's product
    assert (size_1b.layers, size_1b.hidden, size_1b.vocab) == (22, 2048, 32000)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("world", [1, 8])
def test_model_states_per_gpu_equal_deepspeeds_estimators(size_1b, stage, offload, world):
    ours = sum(model_state_bytes(size_1b, world, stage, offload).values())
    _, theirs = deepspeed_estimate(size_1b, world, stage, offload)
    assert ours == pytest.approx(theirs, abs=8), (stage, offload, world)  # DeepSpeed rounds down to an int


def test_the_parts_by_hand():
    size = ModelSize(parameters=1000, largest_layer=100, layers=2, hidden=8, vocab=50, matmul_parameters=950)
    assert model_state_bytes(size, 4, 2, False) == {"weights": 2000, "gradients": 1500, "optimizer": 3000,
                                                    "gathered layer": 0}
    assert model_state_bytes(size, 4, 3, False) == {"weights": 500, "gradients": 1000, "optimizer": 3000,
                                                    "gathered layer": 400}
    assert model_state_bytes(size, 4, 3, True) == {"weights": 0, "gradients": 0, "optimizer": 0, "gathered layer": 400}


def test_speed_time_and_gpu_hours_by_hand(size_1b):
    plan = make_plan(size_1b, "H100", 8, 2, False, micro_batch=4, seq_len=2048, checkpointing=True, mfu=0.4,
                     tokens=1e10)
    per_token = 6 * PARAMETERS_1B + 12 * 22 * 2048 * 2048
    assert flops_per_token(size_1b, 2048) == per_token
    assert plan.tokens_per_second == pytest.approx(0.4 * 989e12 * 8 / per_token)
    assert plan.seconds == pytest.approx(1e10 / plan.tokens_per_second)
    assert plan.gpu_hours == pytest.approx(plan.seconds * 8 / 3600)
    assert plan.compute_optimal_tokens == 20 * PARAMETERS_1B
    # Checkpointed activations: each layer's 16-bit input, one layer's full set, the logits.
    tokens = 4 * 2048
    assert plan.memory["activations"] == 22 * 2 * 2048 * tokens + 34 * 2048 * tokens + 6 * 32000 * tokens
    assert plan.fits


def test_plan_prints_the_memory_and_the_verdict():
    fits = run_main_in_process("plan.py", "--config_name", "llama-1b", "--gpu", "H100", "--num_gpus", "8",
                               "--per_device_train_batch_size", "2", "--block_size", "2048", "--tokens", "1e9")
    assert_succeeded(fits)
    assert "Model: 1,034.5M parameters (22 layers x 2048, vocab 32,000)" in fits.stdout
    assert "-> fits in 90% of 74.5 GiB" in fits.stdout
    assert "Tokens: 1,000,000,000 (compute-optimal for this size: 20,690,247,680" in fits.stdout
    assert "--max_steps 30518" in fits.stdout  # 1e9 / (8 GPUs x 2 x 2048), rounded up
    # ZeRO-2 without offload on one 24 GB card: 20 bytes per parameter of model states alone.
    tight = run_main_in_process("plan.py", "--config_name", "llama-1b", "--gpu", "4090", "--num_gpus", "1")
    assert_succeeded(tight)
    assert "does NOT fit" in tight.stdout
    offload = run_main_in_process("plan.py", "--config_name", "llama-1b", "--gpu", "4090", "--num_gpus", "1",
                                  "--zero_stage", "3", "--offload", "true", "--gradient_checkpointing", "true",
                                  "--per_device_train_batch_size", "1")
    assert "-> fits" in offload.stdout and "CPU memory per node for the offloaded states" in offload.stdout
    listed = run_main_in_process("plan.py", "--list_gpus")
    assert all(name in listed.stdout for name in GPUS)


def test_plan_refuses_an_unknown_gpu_in_one_line():
    assert_clean_error(run_main_in_process("plan.py", "--gpu", "H1000"), "--gpu H1000: not in the table")
    assert_clean_error(run_main_in_process("plan.py", "--mfu", "1.5"), "--mfu must be in (0, 1]")


def test_plan_and_mfu_use_the_same_peaks():
    """plan.py's GPU table and the MFU monitor's device lookup give every GPU the same peak."""
    from dstrain.train.monitoring import peak_tflops_for

    assert {name: peak_tflops_for(name) for name in GPUS} == {name: peak for name, (peak, _) in GPUS.items()}
