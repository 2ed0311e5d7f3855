"""Monitoring (dstrain/train/monitoring.py, plot.py): one real 2-rank ZeRO-3-offload run reporting to WandB
offline, read back from its run file; plus the FLOPs formula, the GPU table and token counting."""

import json
import math
from importlib.util import find_spec

import pytest
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, LlamaConfig, LlamaForCausalLM, Trainer

from dstrain.arguments import DataArguments, ModelArguments, TrainingArguments
from dstrain.cli import parse_args
from dstrain.errors import UserError
from dstrain.train.monitoring import (
    add_monitoring,
    load_prompts,
    matmul_parameter_counts,
    peak_tflops_for,
    training_flops_per_token,
)
from tests import wandb_offline
from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_succeeded,
    logged_losses,
    run_deepspeed,
    run_main_in_process,
    script_env,
    train_flags,
)
from tests.test_pretrain import assert_deepspeed_checkpoint, assert_loads_and_generates

STEPS, RANKS, BATCH, ACCUMULATION, BLOCK = 4, 2, 4, 2, 64  # BATCH, ACCUMULATION, BLOCK: conftest.train_flags
TOKENS_PER_STEP = RANKS * BATCH * ACCUMULATION * BLOCK
PROMPTS = ["The for statement", "import"]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, tokenizer_dir, docs_corpus):
    """ZeRO-3 with optimizer and parameters offloaded, 2 CPU ranks, every monitoring feature on."""
    workdir = tmp_path_factory.mktemp("monitored")
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    output_dir = workdir / "out"
    result = run_deepspeed("pretrain.py", "--deepspeed", REPO / "ds_configs/zero3_offload.json",
                           env=script_env(DSTRAIN_COUNT_COLLECTIVES=workdir / "collectives"),
                           *train_flags(tokenizer_dir, docs_corpus, output_dir, workdir / "cache", max_steps=STEPS,
                                        save_steps=STEPS, report_to="wandb", eval_strategy="steps", eval_steps=2,
                                        sample_every=2, sample_prompts=prompts, sample_max_new_tokens=6,
                                        peak_tflops=0.5, run_name="tiny-offload", wandb_project="dstrain-tests",
                                        wandb_group="monitoring", wandb_tags="ci,zero3"))
    assert_succeeded(result)
    run_dirs = list(output_dir.glob("wandb/offline-run-*"))
    assert len(run_dirs) == 1, run_dirs  # rank 1 started no run of its own
    [run_file] = run_dirs[0].glob("run-*.wandb")
    return output_dir, result, run_file


@pytest.mark.slow
def test_no_collective_per_micro_batch_and_one_per_step_and_log(wandb_run):
    """torch.distributed's collectives, counted on both ranks of the shared run (dstrain/train/collective_count.py):
    inside a micro-batch's forward and backward only DeepSpeed's own (ZeRO-3 gathers and reductions) and none
    of ours; between micro-batches, at most the NaN guard's one check per step and the metrics' one gather per
    logging step (every step here), the preemption callback's one signal check per step, plus the barrier
    that completes a checkpoint on the step that saves."""
    output_dir, _, _ = wandb_run
    budget = {"dstrain:faults._gather": 1, "dstrain:monitoring._interval_metrics": 1, "dstrain:distributed.any_rank": 1}
    for r in range(RANKS):
        steps = json.loads((output_dir.parent / "collectives" / f"collectives-rank{r}.json").read_text())
        assert sorted(map(int, steps)) == list(range(1, STEPS + 1))
        for step, counts in steps.items():
            assert counts["micro_batches"] == ACCUMULATION
            assert not [s for s in counts["in_micro_batch"] if s.startswith("dstrain")], counts
            assert counts["in_micro_batch"].get("deepspeed", 0) > 0  # the counting saw ZeRO-3's own traffic
            ours = {s: n for s, n in counts["between"].items() if s.startswith("dstrain")}
            saves = {"dstrain:checkpoints.save_rng_state_then_wait": 1} if int(step) == STEPS else {}
            assert ours == budget | saves, (step, counts)


@pytest.mark.slow
def test_zero3_offload_trains_and_reports_to_wandb_offline(wandb_run):
    """ds_configs/zero3_offload.json (optimizer and parameters in CPU memory) runs end to end, and
    --report_to wandb (offline here) keeps its run files beside the checkpoints."""
    output_dir, _, _ = wandb_run
    assert sorted(logged_losses(output_dir)) == list(range(1, STEPS + 1))
    assert_deepspeed_checkpoint(output_dir / f"checkpoint-{STEPS}", STEPS)
    assert_loads_and_generates(output_dir)


def training_rows(run_file) -> dict[int, dict]:
    return {int(row["train/global_step"]): row for row in wandb_offline.logged_rows(run_file) if "train/loss" in row}


@pytest.mark.slow
def test_throughput_mfu_and_memory_reach_wandb_at_every_logging_step(wandb_run):
    output_dir, _, run_file = wandb_run
    rows = training_rows(run_file)
    assert sorted(rows) == list(range(1, STEPS + 1))
    config = wandb_offline.config(run_file)
    parameters = config["monitoring"]["matmul_parameters"]
    flops_per_token = training_flops_per_token(parameters, parameters, 2, 64, BLOCK)  # tiny: 2 layers of 64
    for step, row in rows.items():
        # Both ranks' tokens, counted once: every block is 64 real tokens.
        assert row["train/tokens_seen"] == step * TOKENS_PER_STEP
        assert row["train/tokens_per_second"] == pytest.approx(RANKS * row["train/tokens_per_second_per_device"])
        assert row["train/samples_per_second"] == pytest.approx(row["train/tokens_per_second"] / BLOCK)
        seconds = TOKENS_PER_STEP / row["train/tokens_per_second"]
        assert row["train/step_time"] == pytest.approx(seconds)
        assert row["train/mfu"] == pytest.approx(flops_per_token * row["train/tokens_per_second"] / (0.5e12 * RANKS))
        assert 0.1 < row["train/peak_memory_gb"] < 20  # the process's resident set on CPU
        assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(row)
    # The same numbers are in trainer_state.json, for plot.py and for runs without WandB.
    history = [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["tokens_seen"] for e in history] == [s * TOKENS_PER_STEP for s in range(1, STEPS + 1)]


@pytest.mark.slow
def test_eval_perplexity_is_logged_beside_eval_loss(wandb_run):
    _, _, run_file = wandb_run
    evals = [row for row in wandb_offline.logged_rows(run_file) if "eval/loss" in row]
    assert {int(row["train/global_step"]) for row in evals} == {2, 4}
    for row in evals:
        assert row["eval/perplexity"] == pytest.approx(math.exp(row["eval/loss"]))


@pytest.mark.slow
def test_sample_generations_are_a_wandb_table_and_printed_once(wandb_run):
    _, result, run_file = wandb_run
    tables = [row for row in wandb_offline.logged_rows(run_file) if "samples/generations/path" in row]
    assert [int(row["train/global_step"]) for row in tables] == [2, 4]
    last = json.loads((run_file.parent / "files" / tables[-1]["samples/generations/path"]).read_text())
    assert last["columns"] == ["step", "prompt", "completion"]
    assert [(step, prompt) for step, prompt, _ in last["data"]] == [(s, p) for s in (2, 4) for p in PROMPTS]
    assert all(completion for _, _, completion in last["data"])
    for step in (2, 4):  # rank 0 printed exactly what it logged, once; rank 1 nothing
        printed = f"Samples at step {step}:\n" + "\n".join(f"  {p!r} -> {c!r}" for s, p, c in last["data"] if s == step)
        assert result.stdout.count(printed) == 1, result.stdout[-3000:]
    assert result.stdout.count("Samples at step") == 2


@pytest.mark.slow
def test_the_run_config_holds_every_argument_and_the_resolved_deepspeed_config(wandb_run):
    _, _, run_file = wandb_run
    config = wandb_offline.config(run_file)
    assert config["run_arguments"]["ModelArguments"]["config_name"] == "tiny"
    assert config["run_arguments"]["DataArguments"]["block_size"] == BLOCK
    assert config["learning_rate"] == 5e-3 and config["sample_every"] == 2  # TrainingArguments, via WandbCallback
    deepspeed = config["deepspeed_config"]
    assert deepspeed["zero_optimization"]["stage"] == 3
    assert deepspeed["zero_optimization"]["offload_param"]["device"] == "cpu"
    # "auto" in the file, the flags' values here.
    assert deepspeed["train_micro_batch_size_per_gpu"] == BATCH
    assert deepspeed["gradient_accumulation_steps"] == ACCUMULATION
    assert deepspeed["train_batch_size"] == BATCH * ACCUMULATION * RANKS
    run = wandb_offline.run_record(run_file)
    assert (run.project, run.display_name, run.run_group, list(run.tags)) == (
        "dstrain-tests", "tiny-offload", "monitoring", ["ci", "zero3"])


@pytest.mark.slow
def test_plot_writes_a_png_of_the_real_run(wandb_run, tmp_path):
    output_dir, _, _ = wandb_run
    result = run_main_in_process("plot.py", output_dir / "trainer_state.json", "-o", tmp_path / "curves.png")
    assert_succeeded(result)
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_plot_refuses_a_file_that_is_not_a_trainer_state(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"log_history": [\n')
    assert_clean_error(run_main_in_process("plot.py", tmp_path), f"{tmp_path / 'trainer_state.json'}:2: not valid JSON")


# ===== units =====

def test_flops_per_token_matches_a_hand_count():
    # 1,000 weights: 2 FLOPs each forward, 4 backward; attention, 2 layers of 64 at 32 positions:
    # a token's query against 32 keys of width 64 (QK^T) and its weighted sum of 32 values (AV) are
    # 2 * 32 * 64 FLOPs each: 8,192 per layer forward, 16,384 for 2 layers, x3 with the backward pass.
    assert training_flops_per_token(1000, 1000, 2, 64, 32) == 6000 + 3 * 16384
    # LoRA-like: frozen weights still pass gradients back to the activations, but get none themselves.
    assert training_flops_per_token(1000, 10, 0, 64, 32) == 4000 + 20


def test_matmul_parameters_skip_only_an_untied_input_embedding():
    shape = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    tied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    untied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    total_tied = sum(p.numel() for p in tied.parameters())  # parameters() lists a tied weight once
    assert matmul_parameter_counts(tied) == (total_tied, total_tied)
    untied.get_input_embeddings().weight.requires_grad_(False)
    total = sum(p.numel() for p in untied.parameters())
    assert matmul_parameter_counts(untied) == (total - 1600, total - 1600)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA L40", 181),
    ("NVIDIA L4", 121), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165), ("Tesla V100-SXM2-32GB", 125),
    ("NVIDIA RTX 6000 Ada Generation", 364), ("NVIDIA RTX A6000", 155), ("NVIDIA A10G", None), ("NVIDIA GH200 480GB", 989), ("Some New Accelerator", None),
])
def test_peak_tflops_table(name, tflops):
    assert peak_tflops_for(name) == tflops


def test_tokens_seen_count_the_attention_mask_not_the_padding(tmp_path, tokenizer_dir):
    """In one process with padded batches: tokens_seen is the sum of the attention masks trained on."""
    lengths = [5, 9, 3, 12, 7, 4]
    data = Dataset.from_dict({"input_ids": [list(range(10, 10 + n)) for n in lengths]})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, pad_token_id=0))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                             logging_steps=1, report_to="none", save_strategy="no", peak_tflops=1.0,
                             disable_tqdm=True)

    def pad(rows):
        batch = DataCollatorWithPadding(tokenizer)([{"input_ids": r["input_ids"]} for r in rows])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=pad, processing_class=tokenizer)
    add_monitoring(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert logs[-1]["tokens_seen"] == sum(lengths)
    assert all(entry["mfu"] > 0 for entry in logs)
    # Evaluation's forward passes (model.eval(), no gradients) count nothing.
    trainer.evaluate(data)
    assert trainer.state.num_input_tokens_seen == sum(lengths)


def test_sample_prompts_from_files_and_clear_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond line\n")
    (tmp_path / "p.json").write_text('["a", "b"]')
    (tmp_path / "bad.json").write_text('{"a": 1}')
    assert load_prompts([str(tmp_path / "p.txt")]) == ["first", "second line"]
    assert load_prompts([str(tmp_path / "p.json")]) == ["a", "b"]
    assert load_prompts(["just text"]) == ["just text"]
    with pytest.raises(UserError, match="bad.json:1: expected a JSON list"):
        load_prompts([str(tmp_path / "bad.json")])
    with pytest.raises(UserError, match="no file at"):
        load_prompts([str(tmp_path / "missing.txt")])


def test_report_to_swanlab_without_the_package_is_one_clear_line(tmp_path, tokenizer_dir, docs_corpus):
    if find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here")
    result = run_main_in_process("pretrain.py", *train_flags(tokenizer_dir, docs_corpus, tmp_path / "out",
                                                             tmp_path / "cache", report_to="swanlab"))
    assert_clean_error(result, "--report_to swanlab needs the swanlab package: pip install swanlab")


def test_bad_monitoring_flags_are_refused(tmp_path):
    base = ["--config_name", "tiny", "--tokenizer_name", "tok", "--train_files", "x.jsonl", "--output_dir", str(tmp_path)]
    for flags, message in ((["--peak_tflops", "0"], "--peak_tflops must be positive"),
                           (["--sample_every", "5", "--sample_prompts", "nope.txt"], "no file at nope.txt")):
        with pytest.raises(UserError, match=message):
            parse_args((ModelArguments, DataArguments, TrainingArguments), base + flags)
