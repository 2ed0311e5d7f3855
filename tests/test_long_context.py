"""Long context: --sequence_parallel_size (DeepSpeed Ulysses) against the same run without it, on real
CPU ranks; its refusals; and context extension (--rope_scaling, --max_position_embeddings)."""

import json
import shutil
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dstrain.arguments import ModelArguments, RewardTrainingArguments, TrainingArguments
from dstrain.errors import UserError
from dstrain.model.loading import choose_block_size, model_config_for
from dstrain.train import sequence_parallel
from dstrain.train.resume import plan_resume
from tests.helpers import (REPO, assert_clean_error, assert_succeeded, import_script, run_deepspeed,
                           run_main_in_process, train_flags)

STEPS, SAVE_AT = 6, 3
MAX_GRAD_NORM = 1.0  # the runs' grad norms straddle it: clipping acts on some steps and not on others
TOLERANCE = 1e-4


def sp_flags(base_model, corpus, output_dir, cache_dir, **overrides):
    """Continued pretraining of the session's tiny model (so ZeRO-2 and ZeRO-3, which draw a new model's
    random weights differently, start from the same weights); block 64 = 2 x 32 tokens per rank; its
    4 heads and 2 key/value heads split by 2."""
    flags = train_flags(base_model, corpus, output_dir, cache_dir, **({"max_steps": STEPS, "save_steps": SAVE_AT,
                        "max_grad_norm": MAX_GRAD_NORM, "attn_implementation": "sdpa",
                        "peak_tflops": 1} | overrides))  # any peak: MFU is logged and compared per token
    at = flags.index("--config_name")
    return flags[:at] + ["--model_name_or_path", str(base_model)] + flags[at + 2:]


def log_entries(output_dir: Path) -> dict[int, dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def assert_same_steps(reference: dict[int, dict], split: dict[int, dict]) -> None:
    """Every step's loss and grad norm equal within TOLERANCE (without the gradient-scale fix, every
    split grad norm under ZeRO-1/2 is exactly twice the reference's)."""
    assert sorted(reference) == sorted(split) == list(range(1, STEPS + 1))
    for step in reference:
        assert split[step]["loss"] == pytest.approx(reference[step]["loss"], abs=TOLERANCE), (step, reference, split)
        assert split[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], abs=TOLERANCE), step


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory, base_model, docs_corpus, cache_dir):
    """One rank without sequence parallelism (the reference), and two ranks splitting every sequence
    in two (one SP group, no data parallelism) under ZeRO-2 and ZeRO-3, without and with ALST's tiled MLP
    and tiled loss (dstrain/train/tiled_compute.py): the same weights, data, batches and steps."""
    root = tmp_path_factory.mktemp("longctx")
    runs = {}
    for name, ranks, config, size, tiled in (("reference", 1, "zero2", 1, False), ("zero2", 2, "zero2", 2, False),
                                             ("zero3", 2, "zero3", 2, False), ("zero2_tiled", 2, "zero2", 2, True),
                                             ("zero3_tiled", 2, "zero3", 2, True)):
        output_dir = root / name
        result = run_deepspeed("pretrain.py", "--deepspeed", REPO / f"ds_configs/{config}.json",
                               *sp_flags(base_model, docs_corpus, output_dir, cache_dir, sequence_parallel_size=size,
                                         tiled_mlp=tiled, tiled_loss=tiled), ranks=ranks)
        assert_succeeded(result)
        runs[name] = output_dir
        (output_dir / "stdout.txt").write_text(result.stdout)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero2_tiled", "zero3_tiled"])
def test_sequence_parallel_matches_one_rank_losses_and_grad_norms(sp_runs, stage):
    reference, split = log_entries(sp_runs["reference"]), log_entries(sp_runs[stage])
    assert_same_steps(reference, split)
    norms = [entry["grad_norm"] for entry in reference.values()]
    assert min(norms) < MAX_GRAD_NORM < max(norms), norms  # clipping acted on some steps, not all
    assert len({round(entry["loss"], 3) for entry in reference.values()}) == STEPS  # the runs trained
    # Each token counted once: the two ranks together saw as many tokens as the one rank did.
    assert split[STEPS]["tokens_seen"] == reference[STEPS]["tokens_seen"] == STEPS * 8 * 64
    assert split[STEPS]["samples_per_second"] == pytest.approx(
        split[STEPS]["tokens_per_second"] / 64, rel=1e-6)  # a sequence counted once, not once per rank
    # MFU counts each token once, and attention at the whole sequence's length: the FLOPs per token (MFU x
    # devices / tokens per second, at any peak) are the 1-rank run's.
    assert split[STEPS]["mfu"] * 2 / split[STEPS]["tokens_per_second"] == pytest.approx(
        reference[STEPS]["mfu"] / reference[STEPS]["tokens_per_second"], rel=1e-6)
    assert (sp_runs[stage] / "model.safetensors").is_file()
    # The tiled run did tile: every rank's 32-token slice in 2 shards (the rules give at least 2); under ZeRO-3
    # both ranks must call the projections as often as each other, or their parameter gathers would not match.
    stdout = (sp_runs[stage] / "stdout.txt").read_text()
    assert ("--tiled_mlp: 2 MLP blocks in 2 shards of up to 16 tokens" in stdout) == stage.endswith("tiled")
    assert ("--tiled_loss: the logits and loss in 2 shards of up to 16 tokens" in stdout) == stage.endswith("tiled")


@pytest.mark.slow
def test_sequence_parallel_resumes_with_the_same_size_and_refuses_another(sp_runs, base_model, docs_corpus,
                                                                        cache_dir, tmp_path):
    """The ZeRO-2 run's checkpoint at step 3, continued to step 6, gives the uninterrupted run's steps;
    continuing it without sequence parallelism is refused in one line before any work."""
    chain = tmp_path / "chain"
    chain.mkdir()
    shutil.copytree(sp_runs["zero2"] / f"checkpoint-{SAVE_AT}", chain / f"checkpoint-{SAVE_AT}")
    flags = sp_flags(base_model, docs_corpus, chain, cache_dir)
    refused = run_main_in_process("pretrain.py", *flags, "--resume_from_checkpoint", "last")  # size 1, one process
    assert_clean_error(refused, f"checkpoint-{SAVE_AT} was trained with --sequence_parallel_size 2", "asks for 1")
    elsewhere = SimpleNamespace(resume_from_checkpoint=str(chain / f"checkpoint-{SAVE_AT}"), output_dir=str(chain),
                                deepspeed="zero2.json", world_size=4, sequence_parallel_size=2)
    with pytest.raises(UserError, match="written by 2 ranks; this run has 4. Resuming on another number of ranks"):
        plan_resume(elsewhere)  # what 4 ranks would decide: refused, not converted for another world size
    resumed = run_deepspeed("pretrain.py", "--deepspeed", REPO / "ds_configs/zero2.json", *flags,
                            "--sequence_parallel_size", "2", "--resume_from_checkpoint", "last")
    assert_succeeded(resumed)
    full, continued = log_entries(sp_runs["zero2"]), log_entries(chain)
    assert sorted(continued) == list(range(1, STEPS + 1))
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert continued[step]["loss"] == pytest.approx(full[step]["loss"], abs=TOLERANCE), step
        assert continued[step]["grad_norm"] == pytest.approx(full[step]["grad_norm"], abs=TOLERANCE), step


SFT_MAX_GRAD_NORM = 1.2  # the packed SFT runs' grad norms straddle it (1.0 to 1.45 unclipped)


def sft_flags(base_model, chat_file, output_dir, size, config="zero2"):
    return ["--deepspeed", REPO / f"ds_configs/{config}.json", "--model_name_or_path", base_model,
            "--train_files", chat_file, "--max_length", "128", "--packing", "true", "--drop_too_long", "true",
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--max_steps", str(STEPS),
            "--max_grad_norm", str(SFT_MAX_GRAD_NORM), "--logging_steps", "1", "--save_steps", "100",
            "--report_to", "none", "--validation_split_percentage", "5", "--output_dir", output_dir,
            "--data_cache_dir", output_dir.parent / "cache", "--gradient_checkpointing", "--seed", "3",
            "--attn_implementation", "sdpa", "--sequence_parallel_size", str(size)]


@pytest.fixture(scope="module")
def packed_sft_runs(tmp_path_factory, base_model, chat_file):
    """Packed SFT on 1 rank (the reference), and split across 2 ranks under ZeRO-2 and under ZeRO-3 (whose
    reduce-scatter scales the SP gradient differently: `gradient_share`)."""
    root = tmp_path_factory.mktemp("packed_sft")
    runs = {}
    for name, ranks, config, size in (("reference", 1, "zero2", 1), ("zero2", 2, "zero2", 2), ("zero3", 2, "zero3", 2)):
        result = run_deepspeed("sft.py", *sft_flags(base_model, chat_file, root / name, size, config), ranks=ranks)
        assert_succeeded(result)
        runs[name] = root / name
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_packed_sft_with_sequence_parallelism_matches_one_rank(packed_sft_runs, stage):
    """Packed SFT rows (several conversations each, their attention kept apart by the position_ids) split
    across 2 ranks, with activation checkpointing: the 1-rank run's losses and grad norms."""
    reference, split = log_entries(packed_sft_runs["reference"]), log_entries(packed_sft_runs[stage])
    assert_same_steps(reference, split)
    assert len({round(entry["loss"], 3) for entry in reference.values()}) == STEPS
    norms = [entry["grad_norm"] for entry in reference.values()]
    assert min(norms) < SFT_MAX_GRAD_NORM < max(norms), norms  # clipping acted on some steps, not all
    # Evaluation is not split (DeepSpeed's disable_in_eval): each rank scores its own share of the validation
    # rows, as in any 2-rank run, so its loss is averaged over other batches than the 1-rank run's.
    assert "eval_loss" in json.loads((packed_sft_runs[stage] / "eval_results.json").read_text())
    assert (packed_sft_runs[stage] / "model.safetensors").is_file()  # under ZeRO-3: gathered from the shards


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, base_model, docs_corpus, cache_dir):
    """LoRA continued pretraining on 1 rank (the reference), and split across 2 ranks under ZeRO-2 and ZeRO-3."""
    root = tmp_path_factory.mktemp("lora_sp")
    runs = {}
    for name, ranks, config, size in (("reference", 1, "zero2", 1), ("zero2", 2, "zero2", 2), ("zero3", 2, "zero3", 2)):
        flags = sp_flags(base_model, docs_corpus, root / name, cache_dir, sequence_parallel_size=size,
                         max_grad_norm=0.18, save_steps=100, validation_split_percentage=0)
        result = run_deepspeed("lora.py", "--deepspeed", REPO / f"ds_configs/{config}.json", *flags, "--stage",
                               "pretrain", "--lora_r", "8", "--lora_dropout", "0", ranks=ranks)
        assert_succeeded(result)
        runs[name] = root / name
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_lora_with_sequence_parallelism_matches_one_rank(lora_runs, stage):
    """LoRA adapters over the frozen tiny model (PEFT wraps it; Ulysses must still find its attention),
    continued pretraining on blocks split across 2 ranks: the 1-rank run's losses and grad norms."""
    reference, split = log_entries(lora_runs["reference"]), log_entries(lora_runs[stage])
    assert_same_steps(reference, split)
    norms = [entry["grad_norm"] for entry in reference.values()]
    assert min(norms) < 0.18 < max(norms), norms  # clipping acted on some steps, not all
    assert (lora_runs[stage] / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2 or find_spec("flash_attn") is None,
                    reason="flash attention and bf16 need 2 CUDA GPUs and flash-attn (run on the GPU machine)")
def test_packed_sft_on_flash_attention_matches_one_gpu(tmp_path, base_model, chat_file):
    """The GPU path: flash attention keeps packed conversations apart from the position_ids alone (rows
    flattened into one, padded to a multiple of the split), in bf16, so the tolerance is bf16's."""
    runs = {}
    for name, ranks, size in (("reference", 1, 1), ("split", 2, 2)):
        flags = sft_flags(base_model, chat_file, tmp_path / name, size)
        flags[flags.index("sdpa")] = "flash_attention_2"
        result = run_deepspeed("sft.py", *flags, "--bf16", ranks=ranks)
        assert_succeeded(result)
        runs[name] = log_entries(tmp_path / name)
    for step in runs["reference"]:
        assert runs["split"][step]["loss"] == pytest.approx(runs["reference"][step]["loss"], abs=2e-2), step


# ===== refusals, in-process =====

def test_sequence_parallel_size_must_fit_the_launch(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="does not divide the world size 2"):
        TrainingArguments(output_dir=str(tmp_path), sequence_parallel_size=3, deepspeed="ds_configs/zero2.json")
    with pytest.raises(UserError, match="needs DeepSpeed"):
        TrainingArguments(output_dir=str(tmp_path), sequence_parallel_size=2)
    with pytest.raises(UserError, match="at least 1"):
        TrainingArguments(output_dir=str(tmp_path), sequence_parallel_size=0)
    with pytest.raises(UserError, match="reward.py, dpo.py and grpo.py"):
        RewardTrainingArguments(output_dir=str(tmp_path), sequence_parallel_size=2)


def tiny_model(attn="sdpa", **sizes):
    config = AutoConfig.for_model("llama", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                  vocab_size=64, **({"num_attention_heads": 4, "num_key_value_heads": 2} | sizes))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def test_models_ulysses_cannot_split_are_refused():
    assert sequence_parallel.check_model(tiny_model(), 2) == "sdpa"
    assert sequence_parallel.check_model(tiny_model(), 4) == "sdpa"  # 4 ranks share 2 kv heads: replicated
    with pytest.raises(UserError, match="attention 'eager' cannot be split"):
        sequence_parallel.check_model(tiny_model("eager"), 2)
    with pytest.raises(UserError, match="does not divide the 4 attention heads"):
        sequence_parallel.check_model(tiny_model(), 3)
    with pytest.raises(UserError, match="the 3 key/value heads"):
        sequence_parallel.check_model(tiny_model(num_attention_heads=6, num_key_value_heads=3), 2)
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=1,
                                                                  vocab_size=64))
    with pytest.raises(UserError, match="does not call its attention through transformers' attention interface"):
        sequence_parallel.check_model(mamba, 2)
    with pytest.raises(UserError, match="--block_size 63 is not divisible by --sequence_parallel_size 2"):
        sequence_parallel.check_sequence_length(63, 2, "--block_size")


def test_gradient_share_follows_deepspeeds_reduction():
    assert sequence_parallel.gradient_share({"stage": 2}, 2) == 0.5  # ZeRO-1/2 divide by the data-parallel size
    assert sequence_parallel.gradient_share({}, 4) == 0.25  # no ZeRO: the engine's all-reduce does the same
    assert sequence_parallel.gradient_share({"stage": 3}, 2) == 1.0  # reduce-scatter averages over SP x DP
    with pytest.raises(UserError, match="needs \"reduce_scatter\": true"):
        sequence_parallel.gradient_share({"stage": 3, "reduce_scatter": False}, 2)


def test_chat_data_needs_packing_and_a_max_length_the_split_divides():
    sequence_parallel.check_chat_rows(1, False, 127)  # without the flag, nothing to check
    sequence_parallel.check_chat_rows(2, True, 128)
    with pytest.raises(UserError, match="needs --packing"):
        sequence_parallel.check_chat_rows(2, False, 128)
    with pytest.raises(UserError, match="--max_length 127 is not divisible by --sequence_parallel_size 2"):
        sequence_parallel.check_chat_rows(2, True, 127)


def test_packed_rows_pad_to_a_multiple_of_the_split():
    from dstrain.data.sft import IGNORE, PackedRowsCollator

    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8, 9], "labels": [IGNORE, 9], "position_ids": [0, 1]}]
    batch = PackedRowsCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]  # padding: a segment of its own
    flat = PackedRowsCollator(pad_token_id=0, flatten=True, pad_to_multiple_of=4)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert flat["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, IGNORE]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_packed_sdpa_keeps_conversations_apart_like_transformers():
    """After Ulysses' all-to-all the mask is gone: the block-causal mask rebuilt from the position_ids gives
    what transformers' own packed-row mask gives, and a row that does not restart stays plainly causal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 6, 8) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    ours, _ = sequence_parallel.packed_sdpa(module, query, key, value, None, position_ids=packed)
    first, _ = sdpa_attention_forward(module, query[:, :, :3], key[:, :, :3], value[:, :, :3], None)
    second, _ = sdpa_attention_forward(module, query[:, :, 3:], key[:, :, 3:], value[:, :, 3:], None)
    torch.testing.assert_close(ours, torch.cat([first, second], dim=1))  # each conversation on its own
    plain, _ = sequence_parallel.packed_sdpa(module, query, key, value, None, position_ids=torch.arange(6)[None])
    causal, _ = sdpa_attention_forward(module, query, key, value, None)
    torch.testing.assert_close(plain, causal)
    assert not torch.allclose(ours, plain)


# ===== the GPU benchmark's search (bench/long_context.py), without a GPU =====

@pytest.mark.parametrize("fits_up_to, start, want", [(37_000, 4096, (36_864, False)),  # doubling, then bisection
                                                     (3_000, 4096, (2_048, False)),  # even the start is too long
                                                     (500, 4096, (0, False)),  # nothing fits
                                                     (10**9, 4096, (262_144, True))])  # the limit, capped
def test_benchmark_finds_the_longest_length_that_fits(fits_up_to, start, want):
    """A stand-in for "a short run at this length trains": the doubling-then-bisection search finds the
    longest multiple of the quantum that fits, never tries a length twice, and stays at or under the limit."""
    bench = import_script("bench/long_context.py")
    tried = []

    def fits(length):
        tried.append(length)
        return length <= fits_up_to

    assert bench.longest_that_fits(fits, start, 262_144, 1024) == want
    assert len(tried) == len(set(tried)) and max(tried) <= 262_144
    assert all(length % 1024 == 0 for length in tried)
    if fits_up_to == 37_000:
        assert tried[:5] == [4096, 8192, 16384, 32768, 65536] and len(tried) <= 5 + 5  # log2(32768 / 1024) bisections


def test_benchmark_stops_in_one_line_without_a_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    monkeypatch.setattr("sys.argv", ["bench/long_context.py", "--configs", "1gpu"])
    with pytest.raises(SystemExit, match="^error: bench/long_context.py needs CUDA GPUs and found none: [^\n]*$"):
        import_script("bench/long_context.py").main()  # before any trial, tokenizer or corpus is made


# ===== context extension =====

@pytest.mark.parametrize("flag, rope", [("linear:2", {"rope_type": "linear", "factor": 2.0}),
                                        ("yarn:2", {"rope_type": "yarn", "factor": 2.0,
                                                    "original_max_position_embeddings": 512}),
                                        ('{"type": "dynamic", "factor": 2}', {"rope_type": "dynamic", "factor": 2,
                                                                             "original_max_position_embeddings": 512})])
def test_rope_scaling_extends_the_context_and_the_block_size_follows(tokenizer_dir, flag, rope):
    from dstrain.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    args = ModelArguments(config_name="tiny", tokenizer_name=str(tokenizer_dir), rope_scaling=flag)
    config = model_config_for(args, tokenizer)
    assert config.max_position_embeddings == 1024  # the tiny preset's 512, times 2
    assert {key: config.rope_parameters[key] for key in rope} == rope
    assert choose_block_size(None, config, "tiny", follow_context=args.extends_context()) == 1024
    longer = model_config_for(ModelArguments(config_name="tiny", tokenizer_name=str(tokenizer_dir),
                                             rope_scaling=flag, max_position_embeddings=768), tokenizer)
    assert longer.max_position_embeddings == 768


@pytest.mark.parametrize("flag, message", [("cubic:2", "rope type 'cubic' is not one of"),
                                           ("yarn:0.5", "factor must be a number of at least 1"),
                                           ("yarn", "expected TYPE:FACTOR"),
                                           ('{"rope_type": "llama3", "factor": 2}', "low_freq_factor")])
def test_bad_rope_scaling_is_one_line(tokenizer_dir, flag, message):
    from dstrain.model.loading import load_tokenizer

    args = ModelArguments(config_name="tiny", tokenizer_name=str(tokenizer_dir), rope_scaling=flag)
    with pytest.raises(UserError, match=message):
        model_config_for(args, load_tokenizer(str(tokenizer_dir)))


def test_continued_pretraining_at_an_extended_context(base_model, docs_corpus, cache_dir, tmp_path):
    """The trained tiny model (context 512) continues at 1024 tokens with YaRN: blocks of 1024 by default,
    the audit checks rows against the new context, and the saved model loads extended without dstrain."""
    out = tmp_path / "extended"
    result = run_main_in_process(
        "pretrain.py", "--model_name_or_path", base_model, "--rope_scaling", "yarn:2", "--train_files", docs_corpus,
        "--per_device_train_batch_size", "1", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "100",
        "--validation_split_percentage", "0", "--report_to", "none", "--output_dir", out, "--data_cache_dir",
        cache_dir)
    assert_succeeded(result)
    assert log_entries(out)[2]["tokens_seen"] == 2 * 1024  # two blocks of the new context, by default
    saved = AutoConfig.from_pretrained(out)
    assert saved.max_position_embeddings == 1024
    assert saved.rope_parameters["rope_type"] == "yarn" and saved.rope_parameters["factor"] == 2.0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.rotary_emb.rope_type == "yarn"
    # The audit compares rows with the extended context: the same model and 2048-token rows fail it.
    from dstrain.audit.model_checks import context_findings

    assert context_findings(saved, {"train": type("Blocks", (), {"block_size": 1024})()}) == []
    [finding] = context_findings(saved, {"train": type("Blocks", (), {"block_size": 2048})()})
    assert "context is 1,024 positions (rope yarn)" in str(finding)
