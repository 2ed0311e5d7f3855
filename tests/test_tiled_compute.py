"""--tiled_mlp and --tiled_loss (ALST's tiled compute through DeepSpeed's sequence_tiled_compute): the same
losses and gradients as the untiled model, in-process; the shard rules; the refusals. The 2-rank run under ZeRO-3 with sequence
parallelism is in test_long_context.py (sp_runs)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dstrain.arguments import DPOTrainingArguments, TrainingArguments
from dstrain.errors import UserError
from dstrain.train import tiled_compute


def tiny_llama(**overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **({"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                                               "vocab_size": 64, "num_attention_heads": 4,
                                               "num_key_value_heads": 2} | overrides))
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def loss_and_grads(model, ids, scale=1.0, **inputs):
    model.zero_grad()
    loss = model(input_ids=ids, **({"labels": ids} | inputs)).loss
    (loss * scale).backward()  # as gradient accumulation or the sequence-parallel share scale it
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch, length", [(1, 37), (2, 37), (2, 3)])  # uneven tiles; 3 tokens in 4: an empty one
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(batch, length, checkpointing):
    ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(length))
    reference, tiled = tiny_llama(), tiny_llama()
    assert tiled_compute.tile_mlps(tiled, shards=4) == 2
    for model in (reference, tiled):
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(tiled, ids)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    assert got.keys() == want.keys() and any("mlp" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    # The tiling is really in place: an MLP block called on a 3-d input goes through DeepSpeed's tiled function.
    with torch.no_grad():
        hidden = torch.randn(1, 8, 48)
        assert tiled.model.layers[0].mlp(hidden).shape == (1, 8, 48)
    assert tiled.model.layers[0].mlp.forward.__name__ == "tiled"


def test_tiled_mlp_under_lora_trains_the_adapters_alone():
    """PEFT's LoRA layers sit inside the MLP blocks: their gradients (and only theirs) come through the tiles."""
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])  # random B too, so every adapter has a gradient to compare
    reference = get_peft_model(tiny_llama(), lora)
    tiled = get_peft_model(tiny_llama(), lora)
    tiled.load_state_dict(reference.state_dict())
    tiled_compute.tile_mlps(tiled, shards=3)
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(tiled, ids)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    assert got.keys() == want.keys() and all("lora_" in name for name in got)
    assert any("mlp" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("inputs", ["labels", "masked", "num_items", "shift_labels"])
def test_tiled_loss_gives_transformers_loss_and_gradients(tied, inputs):
    """The causal-LM loss in shards (the head's logits made per shard, again in backward): transformers' value
    and gradients, with ignored labels, the Trainer's num_items_in_batch, Ulysses' pre-shifted labels, a tied
    head, and the loss scaled after the fact (DeepSpeed's TiledFusedLogitsLoss gets the head's gradient wrong
    then: it ignores the scale)."""
    ids = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :11] = -100  # a prompt
    labels[1, 20:] = -100  # padding
    given = {"labels": {}, "masked": {"labels": labels},
             "num_items": {"labels": labels, "num_items_in_batch": torch.tensor(70)},
             "shift_labels": {"labels": labels,
                              "shift_labels": torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()},
             }[inputs]
    reference, tiled = tiny_llama(tie_word_embeddings=tied), tiny_llama(tie_word_embeddings=tied)
    tiled_compute.tile_loss(tiled, shards=3)
    want_loss, want = loss_and_grads(reference, ids, 0.25, **given)
    got_loss, got = loss_and_grads(tiled, ids, 0.25, **given)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    assert got.keys() == want.keys() and ("lm_head.weight" in got) != tied
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    # No logits in training: that is the point. In eval the untouched forward gives them as before.
    tiled.eval()
    with torch.no_grad():
        assert tiled(input_ids=ids, labels=ids).logits.shape == (2, 29, 64)


def test_tiled_loss_and_mlp_together_under_lora():
    ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(3))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["gate_proj", "q_proj"])
    reference = get_peft_model(tiny_llama(), lora)
    tiled = get_peft_model(tiny_llama(), lora)
    tiled.load_state_dict(reference.state_dict())
    tiled_compute.tile_mlps(tiled, shards=4)
    tiled_compute.tile_loss(tiled, shards=2)
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(tiled, ids)
    assert got_loss == pytest.approx(want_loss, abs=1e-6) and got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_shards_follow_alst_rule():
    assert tiled_compute.shards_for(32768, 1, 2048) == 16  # llama-1b at 32k tokens: tiles of 2048
    assert tiled_compute.shards_for(32768, 4, 2048) == 4  # a rank's slice under 4-way sequence parallelism
    assert tiled_compute.shards_for(64, 2, 64) == 2  # never fewer than 2
    assert tiled_compute.shards_for(1000, 1, 64) == 16  # ceil(1000 / 64)
    assert tiled_compute.loss_shards_for(32768, 1, 32000) == 16  # 4 GiB of fp32 logits in 256 MiB shards
    assert tiled_compute.loss_shards_for(32768, 8, 32000) == 2
    assert tiled_compute.loss_shards_for(64, 1, 1000) == 2


def test_tiled_mlp_refusals(tmp_path):
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=1,
                                                                  vocab_size=64))
    with pytest.raises(UserError, match="MambaForCausalLM has no MLP blocks to tile"):
        tiled_compute.tile_mlps(mamba, 4)
    with pytest.raises(UserError, match="--tiled_mlp_shards must be at least 2"):
        TrainingArguments(output_dir=str(tmp_path), tiled_mlp=True, tiled_mlp_shards=1)
    headless = AutoModel.from_config(AutoConfig.for_model("llama", hidden_size=32, intermediate_size=32,
                                                          num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    with pytest.raises(UserError, match="LlamaModel is not a causal LM with a decoder and an output head"):
        tiled_compute.tile_loss(headless, 2)
    with pytest.raises(UserError, match="--tiled_mlp and --tiled_loss are for pretrain.py, sft.py and lora.py"):
        DPOTrainingArguments(output_dir=str(tmp_path), tiled_loss=True)


def test_tiled_compute_refuses_image_text_models(tmp_path, image_text_model):
    """A LLaVA-style model's vision tower has MLP blocks too, which the text's shard count must not cut."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(image_text_model)
    args = TrainingArguments(output_dir=str(tmp_path), tiled_mlp=True)
    with pytest.raises(UserError, match="image-text models are not supported"):
        tiled_compute.apply(args, model, 64)
