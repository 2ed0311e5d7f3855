"""dstrain/model/config.py and init_model.py: the model is derived from the tokenizer (vocab size and
special ids), presets build the models they promise, a model/tokenizer pair that disagrees is refused.

Model sizes are checked on the meta device (no memory, no time). init_model.py runs for real once,
and its output is loaded and generates in a fresh process; the --check and bad-preset variations run
the script's `__main__` in this process (see conftest.run_main_in_process).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dstrain.data.records import iter_texts
from dstrain.data.tokenizer import train_bpe_tokenizer
from dstrain.errors import UserError
from dstrain.model.config import PRESET_DIR, check_model_tokenizer_pair, derive_model_config
from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process, run_script

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
SMALL_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def write_spec(folder: Path, name: str, spec: dict) -> str:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def meta_model(config):
    """The model a config describes, with its weights on the meta device (shapes only)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer_1500_dir(tmp_path_factory, docs_corpus) -> Path:
    """A second tokenizer, 1,500 tokens, trained on the same corpus."""
    out = tmp_path_factory.mktemp("tok1500")
    train_bpe_tokenizer(iter_texts([docs_corpus]), vocab_size=1500).save_pretrained(out)
    return out


# --- derive_model_config ----------------------------------------------------------------------

def test_tokenizer_decides_vocab_and_special_ids(tmp_path, tokenizer):
    """A preset (or an override) that states vocab_size and bos/eos/pad ids is overruled by the tokenizer;
    its other values and its `_comment` handling stay as written."""
    lying = write_spec(tmp_path, "lying", {
        "_comment": "copied from a GPT-2 config", **SMALL_LLAMA,
        "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 7,
    })
    config = derive_model_config(tokenizer, lying, overrides="vocab_size=99,eos_token_id=9")
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1000, 1, 2, 0)
    assert (config.hidden_size, config.num_key_value_heads) == (32, 1)
    assert not hasattr(config, "_comment")


@pytest.mark.parametrize("multiple, expected", [(1, 1000), (64, 1024), (8, 1000), (300, 1200)])
def test_pad_vocab_rounds_up_to_multiple(tokenizer, multiple, expected):
    """pad_vocab_to_multiple_of rounds len(tokenizer) up to the next multiple (an exact one stays)."""
    config = derive_model_config(tokenizer, "tiny", pad_vocab_to_multiple_of=multiple)
    assert config.vocab_size == expected
    assert meta_model(config).get_input_embeddings().weight.shape[0] == expected


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_a_llama(tokenizer, preset):
    """Each configs/models preset parses and builds a LLaMA whose embeddings fit the tokenizer."""
    config = derive_model_config(tokenizer, preset)
    assert config.model_type == "llama"
    model = meta_model(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tuple(model.get_input_embeddings().weight.shape) == (1000, config.hidden_size)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    if config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_tiny_preset_is_under_a_million_parameters(tokenizer):
    assert n_params(meta_model(derive_model_config(tokenizer, "tiny"))) < 1_000_000


def test_llama2_768_shape(tokenizer):
    """llama2-768: 768 wide, 12 layers, 16 query heads sharing 8 KV heads (GQA), in config and weights."""
    config = derive_model_config(tokenizer, "llama2-768")
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (768, 12, 16, 8)
    attention = meta_model(config).model.layers[0].self_attn
    assert attention.q_proj.out_features == 768 and attention.k_proj.out_features == 8 * 768 // 16


def test_llama_120m_is_about_120m_with_a_32k_vocab(tokenizer):
    """llama-120m with a 32,000-token vocabulary (the 1,000-token tokenizer padded to a multiple of
    32,000) has 110-130M parameters."""
    config = derive_model_config(tokenizer, "llama-120m", pad_vocab_to_multiple_of=32000)
    assert config.vocab_size == 32000
    assert 110e6 <= n_params(meta_model(config)) <= 130e6


@pytest.mark.parametrize("spec, width", [
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}, "n_embd"),
    ({**SMALL_LLAMA, "model_type": "qwen2"}, "hidden_size"),
    ({**SMALL_LLAMA, "model_type": "mistral", "sliding_window": 32}, "hidden_size"),
], ids=["gpt2", "qwen2", "mistral"])
def test_other_model_types_work_through_autoconfig(tmp_path, tokenizer, spec, width):
    """A JSON spec with another model_type gets that architecture, still shaped by the tokenizer."""
    config = derive_model_config(tokenizer, write_spec(tmp_path, spec["model_type"], spec))
    assert config.model_type == spec["model_type"]
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (1000, 1, 2)
    model = meta_model(config)
    assert model.config.model_type == spec["model_type"]
    assert tuple(model.get_input_embeddings().weight.shape) == (1000, spec[width])


def test_config_overrides_change_preset_values(tokenizer):
    """--config_overrides key=value pairs take JSON values (numbers) or plain strings over the preset."""
    config = derive_model_config(tokenizer, "tiny", "num_hidden_layers=3,hidden_act=gelu,max_position_embeddings=128")
    assert (config.num_hidden_layers, config.hidden_act, config.max_position_embeddings) == (3, "gelu", 128)
    assert len(meta_model(config).model.layers) == 3
    with pytest.raises(UserError, match="'num_hidden_layers' is not key=value"):
        derive_model_config(tokenizer, "tiny", "num_hidden_layers")


# --- check_model_tokenizer_pair ---------------------------------------------------------------

def test_pair_check_refuses_smaller_vocab(tokenizer, tokenizer_1500_dir):
    """A model with fewer embeddings than the tokenizer has tokens is refused, naming both sizes."""
    config = derive_model_config(tokenizer, "tiny")
    with pytest.raises(UserError, match="vocab_size 1000 is smaller than the tokenizer's 1500 tokens"):
        check_model_tokenizer_pair(config, AutoTokenizer.from_pretrained(tokenizer_1500_dir), "here")


def test_pair_check_refuses_different_eos(tokenizer):
    """A model whose eos id is not the tokenizer's is refused, naming both ids."""
    config = derive_model_config(tokenizer, "tiny")
    config.eos_token_id = 5
    with pytest.raises(UserError, match="eos_token_id is 5 but the tokenizer's is 2"):
        check_model_tokenizer_pair(config, tokenizer, "here")


def test_pair_check_accepts_padded_vocab_and_eos_lists(tokenizer):
    """A vocabulary padded beyond the tokenizer, and an eos list that holds its eos id, are fine."""
    config = derive_model_config(tokenizer, "tiny", pad_vocab_to_multiple_of=64)
    check_model_tokenizer_pair(config, tokenizer, "here")
    config.eos_token_id = [7, tokenizer.eos_token_id]
    check_model_tokenizer_pair(config, tokenizer, "here")


# --- init_model.py ----------------------------------------------------------------------------

LOAD_AND_GENERATE = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
prompt = tok("def main():", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
                  "tokens": len(tok), "new_tokens": out.shape[1] - prompt["input_ids"].shape[1]}))
"""


@pytest.fixture(scope="module")
def initialised(tmp_path_factory, tokenizer_dir):
    """`python init_model.py --config_name tiny` run for real: (the finished process, its output folder)."""
    out = tmp_path_factory.mktemp("init") / "model"
    return run_script("init_model.py", "--tokenizer_name", tokenizer_dir, "--config_name", "tiny",
                      "--output_dir", out), out


def test_init_model_writes_a_folder_that_loads_and_generates(initialised):
    """The folder loads in a fresh process with AutoModelForCausalLM/AutoTokenizer, generates 5 tokens,
    and has the parameter count init_model.py printed."""
    result, out = initialised
    assert_succeeded(result)
    printed = re.search(r"Initialised a new llama model: ([\d.]+)M parameters, vocab 1000", result.stdout)
    assert printed, result.stdout
    loaded = run_script("-c", LOAD_AND_GENERATE, out)
    assert_succeeded(loaded)
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts["new_tokens"] == 5
    assert facts["vocab"] == facts["tokens"] == 1000
    assert abs(facts["params"] / 1e6 - float(printed.group(1))) < 0.006


def test_init_model_check_accepts_the_matching_pair(initialised, tokenizer_dir):
    result, out = initialised
    assert_succeeded(result)
    check = run_main_in_process("init_model.py", "--model_name_or_path", out, "--tokenizer_name", tokenizer_dir,
                                "--check")
    assert_succeeded(check)
    # The last line: transformers prints an "[INFO] Running in WANDB offline mode" line first when WANDB_MODE is set.
    verdict = check.stdout.splitlines()[-1]
    assert verdict.startswith("OK: ") and "vocab 1000 >= 1000 tokens, bos/eos/pad 1/2/0" in verdict


def test_init_model_check_refuses_a_mismatched_pair(initialised, tokenizer_1500_dir):
    """A model made for the 1,000-token tokenizer, checked against the 1,500-token one: clean error."""
    result, out = initialised
    assert_succeeded(result)
    check = run_main_in_process("init_model.py", "--model_name_or_path", out, "--tokenizer_name",
                                tokenizer_1500_dir, "--check")
    assert_clean_error(check, "vocab_size 1000", "1500 tokens", str(out))
    assert check.returncode == 2


def test_init_model_unknown_preset_lists_the_presets(tmp_path, tokenizer_dir):
    """A preset name that does not exist is a clean error listing every preset; nothing is written."""
    result = run_main_in_process("init_model.py", "--tokenizer_name", tokenizer_dir, "--config_name", "llama-7b",
                                 "--output_dir", tmp_path / "out")
    assert_clean_error(result, "'llama-7b'", *PRESETS)
    assert not (tmp_path / "out").exists()


def test_llama_1b_is_about_1b_with_a_32k_vocab(tokenizer):
    """llama-1b (the GPU benchmarks' large preset) with a 32,000-token vocabulary has 0.95-1.1B parameters."""
    config = derive_model_config(tokenizer, "llama-1b", pad_vocab_to_multiple_of=32000)
    assert 0.95e9 <= n_params(meta_model(config)) <= 1.1e9
