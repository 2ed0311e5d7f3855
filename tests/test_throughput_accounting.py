"""Honest throughput (dstrain/train/monitoring.py): tokens without padding, trained tokens, attention
charged per document under packing, MFU and HFU, each against a count done by hand; then one tiny
in-process Trainer run on packed rows under activation checkpointing."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from dstrain.arguments import TrainingArguments
from dstrain.data.sft import PackedRowsCollator
from dstrain.train.monitoring import add_monitoring, batch_counts, training_flops, training_flops_per_token

PAD = 0


def test_a_padded_batch_counts_its_real_tokens_labels_and_one_document_per_row():
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [9, 10, -100, -100]])
    tokens, trained, units = batch_counts(input_ids, mask, labels=labels).tolist()
    assert tokens == 6
    assert trained == 2 + 1  # after the shift: row 1 predicts 7 and 8, row 2 predicts 10
    assert units == 4**2 + 2**2  # attention over each row's real tokens alone


def test_packed_rows_charge_attention_per_conversation_and_leave_the_padding_segment_out():
    # Row 1: conversations of 3 and 2 tokens; row 2: one of 4, then a padding segment of 1 (positions restart).
    input_ids = torch.tensor([[11, 12, 13, 21, 22], [31, 32, 33, 34, PAD]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    labels = torch.tensor([[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]])
    tokens, trained, units = batch_counts(input_ids, input_ids != PAD, position_ids, labels).tolist()
    assert tokens == 9
    assert trained == 3 + 2
    assert units == 3**2 + 2**2 + 4**2  # not 2 rows * 5^2 = 50, as a per-row count would charge
    # Flattened for flash attention's varlen path (one row): the same documents, the same counts.
    flat = batch_counts(input_ids.reshape(1, -1), (input_ids != PAD).reshape(1, -1), position_ids.reshape(1, -1),
                        labels.reshape(1, -1)).tolist()
    assert flat[0] == tokens and flat[2] == units


def test_blocks_without_a_mask_are_one_document_per_row():
    tokens, trained, units = batch_counts(torch.ones(3, 8, dtype=torch.long), labels=torch.ones(3, 8)).tolist()
    assert (tokens, trained, units) == (24, 3 * 7, 3 * 8**2)


def test_mfu_and_hfu_flops_against_a_hand_count():
    n, layers, hidden = 1000, 2, 16
    # 10 tokens in documents of 4 and 6: weights 6N per token, attention 12 * layers * hidden * L per token.
    model = 6 * n * 10 + 12 * layers * hidden * (4 * 4 + 6 * 6)
    assert training_flops(n, n, layers, hidden, 10, 4**2 + 6**2) == model
    # Activation checkpointing recomputes the forward: 2N per token, 4 * layers * hidden * L per token.
    assert training_flops(n, n, layers, hidden, 10, 52, recompute=True) == model + 2 * n * 10 + 4 * layers * hidden * 52
    # LoRA: frozen weights cost 4 per token, trained ones 6.
    assert training_flops(n, 10, 0, 0, 1, 0) == 4 * n + 2 * 10
    # One document of L tokens: the per-token formula times L.
    assert training_flops(n, n, layers, hidden, 8, 64) == 8 * training_flops_per_token(n, n, layers, hidden, 8)


def test_a_packed_run_logs_real_and_trained_tokens_mfu_and_hfu(tmp_path):
    """In one process: two packed rows per step, of which one carries a padding segment; tokens_seen counts
    the conversations' tokens, trained tokens the labelled ones; HFU exceeds MFU by the recomputed forward."""
    rows = [  # (input_ids, labels, position_ids) of packed rows: conversations of 3+2, then 4
        {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, -100, 22], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [31, 32, 33, 34], "labels": [-100, -100, 33, 34], "position_ids": [0, 1, 2, 3]},
    ]
    data = Dataset.from_list(rows * 2)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, pad_token_id=PAD, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                             report_to="none", save_strategy="no", peak_tflops=1.0, disable_tqdm=True,
                             gradient_checkpointing=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=PackedRowsCollator(pad_token_id=PAD))
    monitor = add_monitoring(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["tokens_seen"] for entry in logs] == [9, 18]  # 10 positions per step, 1 of them padding
    parameters, trainable = monitor.parameters, monitor.trainable
    for entry in logs:
        seconds = entry["step_time"]
        assert entry["tokens_per_second"] == pytest.approx(9 / seconds)
        assert entry["trained_tokens_per_second"] == pytest.approx(5 / seconds)
        units = 3**2 + 2**2 + 4**2
        assert entry["mfu"] == pytest.approx(training_flops(parameters, trainable, 2, 16, 9, units) / seconds / 1e12)
        assert entry["hfu"] == pytest.approx(training_flops(parameters, trainable, 2, 16, 9, units, True) / seconds / 1e12)
        assert entry["hfu"] > entry["mfu"]
