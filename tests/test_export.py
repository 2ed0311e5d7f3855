"""export.py beyond merging: GGUF files read back with gguf's reader and run by llama.cpp itself (built
from source once per environment, tests/llama_cpp_tools.py), the Ollama Modelfile, llama-quantize,
llama.cpp's converter for models this project did not train, and 4-bit GPTQ/AWQ through GPTQModel.

The llama.cpp checks use a chat model the tests train (pretrain.py, then sft.py, on 2 ranks) on short
replies, so that it ends its turns with <|im_end|> within a few tokens."""

import builtins
import inspect
import json
import subprocess
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dstrain.errors import BadRecord
from dstrain.export.calibration import calibration_samples
from dstrain.export.gguf_file import GENERATION_MARKER, _interleave_rope_rows, llama_cpp_pre_tokenizer
from dstrain.export.modelfile import CHATML_GO_TEMPLATE, chatml_rendering
from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_succeeded,
    require_slow,
    run_deepspeed,
    run_job,
    run_main_in_process,
    run_script,
)
from tests.llama_cpp_tools import llama_cpp_tools
from tests.quantize_env import quantize_python

IM_END, EOS = 4, 2


def export(*args) -> subprocess.CompletedProcess:
    return run_main_in_process("export.py", *args)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict:
    return {tensor.name: tensor for tensor in reader.tensors}


# ====================================================================== the file itself (fast tier)


@pytest.fixture(scope="module")
def base_ggufs(tmp_path_factory, base_model) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The session's tiny LLaMA (hidden 64, MLP 176) in each type this exporter writes itself."""
    folder = tmp_path_factory.mktemp("gguf")
    made = {}
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        result = export("--model", base_model, "--format", "gguf", "--outtype", outtype,
                        "--output", folder / f"tiny-{outtype}.gguf")
        assert_succeeded(result)
        made[outtype] = (folder / f"tiny-{outtype}.gguf", result)
    return made


def test_gguf_holds_the_llama_hyperparameters_vocabulary_and_chat_template(base_ggufs, base_model):
    tokenizer, model = AutoTokenizer.from_pretrained(base_model), AutoModelForCausalLM.from_pretrained(base_model)
    config = model.config
    reader = gguf.GGUFReader(base_ggufs["f32"][0])
    assert (field(reader, "general.architecture"), field(reader, "general.name")) == ("llama", "tiny-f32")
    assert [field(reader, f"llama.{key}") for key in ("context_length", "embedding_length", "block_count",
                                                      "feed_forward_length", "attention.head_count",
                                                      "attention.head_count_kv", "rope.dimension_count")] == \
        [config.max_position_embeddings, config.hidden_size, config.num_hidden_layers, config.intermediate_size,
         config.num_attention_heads, config.num_key_value_heads, config.head_dim]
    # Byte-level BPE under GPT-2's pre-tokenizer, every token and merge as the tokenizer has them.
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert field(reader, "tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:5] == [gguf.TokenType.CONTROL] * 5 and set(types[5:]) == {gguf.TokenType.NORMAL}
    assert [field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("unknown", "bos", "eos", "padding", "eot")] \
        == [0, 1, 2, 0, IM_END]  # <|im_end|> ends a turn
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # our tokenizer adds no bos
    # The chat template, without transformers' {% generation %} markers, renders what the tokenizer's does.
    template = field(reader, "tokenizer.chat_template")
    assert GENERATION_MARKER.search(tokenizer.chat_template) and not GENERATION_MARKER.search(template)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "str.upper()?"}]
    assert tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True) \
        == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # The weights, exactly (tied: no output tensor; q and k in llama.cpp's RoPE row order).
    written, state = tensors(reader), model.state_dict()
    assert "output.weight" not in written and len(written) == 2 + 9 * config.num_hidden_layers
    assert np.array_equal(written["token_embd.weight"].data, state["model.embed_tokens.weight"].numpy())
    assert np.array_equal(written["blk.1.ffn_down.weight"].data, state["model.layers.1.mlp.down_proj.weight"].numpy())
    assert np.array_equal(written["blk.0.attn_k.weight"].data,
                          _interleave_rope_rows(state["model.layers.0.self_attn.k_proj.weight"],
                                                config.num_key_value_heads).numpy())


def test_each_outtype_quantizes_the_matrices_and_keeps_the_norms_f32(base_ggufs):
    reference = tensors(gguf.GGUFReader(base_ggufs["f32"][0]))
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
    for outtype, type_name in expected.items():
        path, result = base_ggufs[outtype]
        reader = gguf.GGUFReader(path)
        assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{type_name}"]
        for name, tensor in tensors(reader).items():
            kind = tensor.tensor_type.name
            if len(reference[name].shape) == 1:
                assert kind == "F32", name  # norms
            elif outtype == "q8_0" and name.endswith("ffn_down.weight"):
                assert kind == "F16", name  # rows of 176 values are not whole q8_0 blocks of 32
            else:
                assert kind == type_name, name
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            exact = reference[name].data
            assert np.abs(values - exact).max() <= 0.01 * np.abs(exact).max(), name
        if outtype == "q8_0":
            assert "2 tensors have rows that are not whole q8_0 blocks of 32 values and stay f16" in result.stdout
    assert base_ggufs["f16"][0].stat().st_size < 0.6 * base_ggufs["f32"][0].stat().st_size


def test_vocabulary_rows_past_the_tokenizer_are_unused_tokens(tmp_path, tokenizer_dir):
    """--pad_vocab_size_to_multiple_of leaves embedding rows no token uses: llama.cpp gets them as UNUSED."""
    assert_succeeded(run_main_in_process("init_model.py", "--tokenizer_name", tokenizer_dir, "--config_name", "tiny",
                                         "--pad_vocab_size_to_multiple_of", "64", "--output_dir", tmp_path / "m"))
    assert_succeeded(export("--model", tmp_path / "m", "--format", "gguf", "--output", tmp_path / "m.gguf"))
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == field(reader, "llama.vocab_size") == 1024
    assert tokens[1000:] == [f"[PAD{i}]" for i in range(1000, 1024)]
    assert set(types[1000:]) == {gguf.TokenType.UNUSED} and gguf.TokenType.UNUSED not in types[:1000]


def test_the_export_says_what_nfkc_means_for_llama_cpp(base_ggufs):
    printed = base_ggufs["f16"][1].stdout
    assert "applies NFKC normalisation and llama.cpp does not" in printed
    assert "text that is already NFKC-normal tokenizes identically" in printed


def test_rope_row_order_turns_hf_rotation_into_llama_cpp_rotation():
    """HF's LLaMA rotates each head's two halves (rotate_half); llama.cpp's LLaMA rotates adjacent pairs.
    With the rows reordered as written, llama.cpp's rotation gives the same vectors, in that order."""
    torch.manual_seed(0)
    heads, head_dim, hidden, position = 3, 8, 12, 5
    weight, x = torch.randn(heads * head_dim, hidden), torch.randn(hidden)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = position * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    hf = apply_rotary_pos_emb((weight @ x).view(1, heads, 1, head_dim), torch.zeros(1, heads, 1, head_dim),
                              cos.view(1, 1, head_dim), sin.view(1, 1, head_dim))[0].view(heads, head_dim)
    pairs = (_interleave_rope_rows(weight, heads) @ x).view(heads, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    llama_cpp = torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1)
    as_halves = torch.cat([llama_cpp[..., 0], llama_cpp[..., 1]], dim=-1)  # back to HF's order
    assert torch.allclose(as_halves, hf, atol=1e-5)


def test_modelfile_gives_ollama_the_chatml_turns_and_stop(base_ggufs, base_model):
    path = base_ggufs["f16"][0]
    modelfile = path.with_name("tiny-f16.Modelfile").read_text()
    assert f"FROM ./{path.name}\n" in modelfile
    assert f'TEMPLATE """{CHATML_GO_TEMPLATE}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 512" in modelfile
    # What the Go template renders (each message, then the assistant's cue) is the tokenizer's prompt.
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    for chat in ([{"role": "user", "content": "Hi"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"},
                  {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]):
        assert chatml_rendering(chat) == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_an_adapter_exports_as_its_merged_model(tmp_path, base_model):
    """--model <adapter> merges first: the same GGUF as merging with --adapter and exporting the folder."""
    model = AutoModelForCausalLM.from_pretrained(base_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp_path / "adapter")
    assert_succeeded(export("--model", tmp_path / "adapter", "--format", "gguf", "--outtype", "f32",
                            "--output", tmp_path / "from-adapter.gguf"))
    assert_succeeded(export("--adapter", tmp_path / "adapter", "--output_dir", tmp_path / "merged"))
    assert_succeeded(export("--model", tmp_path / "merged", "--format", "gguf", "--outtype", "f32",
                            "--output", tmp_path / "from-merged.gguf"))
    direct, merged = (tensors(gguf.GGUFReader(tmp_path / name)) for name in ("from-adapter.gguf", "from-merged.gguf"))
    assert direct.keys() == merged.keys()
    assert all(np.array_equal(direct[name].data, merged[name].data) for name in direct)
    base = tensors(gguf.GGUFReader(tmp_path / "from-merged.gguf"))  # and the adapter did change the weights
    plain = AutoModelForCausalLM.from_pretrained(base_model).state_dict()["model.layers.0.self_attn.v_proj.weight"]
    assert not np.array_equal(base["blk.0.attn_v.weight"].data, plain.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # the merge's scratch folder is gone
        "adapter", "from-adapter.Modelfile", "from-adapter.gguf", "from-merged.Modelfile", "from-merged.gguf", "merged"]


def test_gguf_requests_that_cannot_work_stop_in_one_line_before_writing(tmp_path, base_model, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize anywhere
    assert_clean_error(export("--model", base_model, "--format", "gguf", "--outtype", "q4_K_M",
                              "--output", tmp_path / "m.gguf"), "needs llama.cpp's llama-quantize", "--llama_quantize")
    assert_clean_error(export("--model", base_model, "--format", "gguf", "--output", tmp_path / "m.bin"),
                       "--output must name a .gguf file")
    assert_clean_error(export("--model", tmp_path / "nothing", "--format", "gguf", "--output", tmp_path / "m.gguf"),
                       "no such folder")
    # A model this writer does not lay out, with no llama.cpp converter given.
    qwen = tmp_path / "qwen"
    tiny_qwen2(qwen, base_model)
    assert_clean_error(export("--model", qwen, "--format", "gguf", "--output", tmp_path / "q.gguf"),
                       "its model_type is qwen2, not llama", "--llama_cpp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen"]


def tiny_qwen2(folder: Path, tokenizer_source: Path) -> None:
    """A randomly initialised Qwen2 with our tokenizer: a model_type AutoConfig knows but this writer does not."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.save_pretrained(folder)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(folder)


def test_pre_tokenizer_is_named_only_when_it_is_gpt2s(base_model):
    ours = AutoTokenizer.from_pretrained(base_model)
    assert llama_cpp_pre_tokenizer(ours) == ("gpt-2", "")
    spec = json.loads(ours.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    name, why = llama_cpp_pre_tokenizer(other)
    assert name is None and "Metaspace" in why


# ====================================================================== 4-bit: refusals and calibration (fast)


def test_4bit_requests_that_cannot_work_stop_in_one_line(tmp_path, base_model, chat_file):
    assert_clean_error(export("--model", base_model, "--format", "gptq", "--output_dir", tmp_path / "q"),
                       "--calibration_files")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert_clean_error(export("--model", base_model, "--format", "awq", "--calibration_files", chat_file,
                              "--output_dir", tmp_path / "full"), "is not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # The test venv has no GPTQModel (the 4-bit tests below install it beside): the line a user sees.
    assert_clean_error(export("--model", base_model, "--format", "gptq", "--calibration_files", chat_file,
                              "--output_dir", tmp_path / "q"), "needs GPTQModel and optimum",
                       'pip install -e ".[quantize]"')
    assert not (tmp_path / "q").exists()


def test_calibration_draws_a_seeded_sample_of_conversations_and_texts(tmp_path, base_model, chat_file):
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"body": f"Text number {i} about str.upper() and lists."}) + "\n"
                             for i in range(50)))
    sample = calibration_samples([str(chat_file), str(texts)], tokenizer, 40, 64, text_field="body", seed=1)
    assert len(sample) == 40 and sample == calibration_samples([str(chat_file), str(texts)], tokenizer, 40, 64,
                                                               text_field="body", seed=1)
    assert all(len(item["input_ids"]) <= 64 and item["attention_mask"] == [1] * len(item["input_ids"])
               for item in sample)
    rendered = [item for item in sample if item["input_ids"][0] == 3]  # conversations start with <|im_start|>
    assert 0 < len(rendered) < 40  # both kinds drawn (165 conversations and 50 texts in the stream)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "fine text here"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(BadRecord, match=f"{bad}:2: neither a conversation nor a 'body' string"):
        calibration_samples([str(bad)], tokenizer, 4, 64, text_field="body")


# ====================================================================== against llama.cpp itself (slow)


def short_reply_chats() -> list[dict]:
    """Questions on Python's builtins and str/list/dict methods answered by the first sentence of their
    docstrings: replies short enough that a tiny model learns to end them with <|im_end|>."""
    chats = []
    for owner, prefix in ((str, "str."), (list, "list."), (dict, "dict."), (builtins, "")):
        for name in sorted(dir(owner)):
            member = getattr(owner, name)
            if name.startswith("_") or not callable(member) or isinstance(member, type):
                continue
            lines = [line for line in (inspect.getdoc(member) or "").splitlines() if line and "(" not in line[:12]]
            answer = lines[0].split(". ")[0].rstrip(".") + "." if lines else ""
            if 10 < len(answer) <= 80:
                chats.append({"messages": [{"role": "user", "content": f"What does {prefix}{name}() do?"},
                                           {"role": "assistant", "content": answer}]})
    return chats


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, zero2_run) -> Path:
    """The session's 2-rank pretraining run, fine-tuned by sft.py (ZeRO-2, 2 ranks) on short replies."""
    folder = tmp_path_factory.mktemp("export-sft")
    data = folder / "short.jsonl"
    data.write_text("".join(json.dumps(chat) + "\n" for chat in short_reply_chats()))
    output_dir = folder / "out"
    result = run_deepspeed(
        "sft.py", "--deepspeed", REPO / "ds_configs/zero2.json", "--model_name_or_path", zero2_run[0],
        "--train_files", data, "--max_length", "128", "--packing", "true", "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-3", "--warmup_ratio", "0.1", "--max_steps", "60", "--logging_steps", "10",
        "--save_steps", "1000", "--report_to", "none", "--validation_split_percentage", "5",
        "--output_dir", output_dir, "--data_cache_dir", folder / "cache", "--seed", "3")
    assert_succeeded(result)
    return output_dir


@pytest.fixture(scope="module")
def llama_cpp():
    require_slow("builds llama.cpp's tools (once per environment)")
    return llama_cpp_tools()


@pytest.fixture(scope="module")
def chat_ggufs(tmp_path_factory, chat_model, llama_cpp) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    folder = tmp_path_factory.mktemp("chat-gguf")
    made = {}
    for outtype in ("f32", "f16", "q8_0", "q4_K_M"):
        result = export("--model", chat_model, "--format", "gguf", "--outtype", outtype,
                        "--output", folder / f"chat-{outtype}.gguf",
                        "--llama_quantize", llama_cpp.tool("llama-quantize"))
        assert_succeeded(result)
        made[outtype] = (folder / f"chat-{outtype}.gguf", result)
    return made


# Varied text, all of it NFKC-normal (the precondition the export states; see the next test).
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Python's str.upper() returns a copy of the string converted to uppercase; see also str.lower().",
    "我想在苹果公司工作。这是一个很好的机会、你好世界「引号」《书名》",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Emoji: 🚀🦙😶\u200d🌫️ ✅ 👍🏽 and a flag 🇫🇷",
    "runs of spaces:     five,\t\ttabs,\n\n\nthree newlines, trailing   \n  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "glued<|im_end|>around</s><s>special<unk>tokens and <|im_start|>",
    "I've been 'told he's there, 'RE you sure? 3.14 333333 1,000,000 $x^2$",
    "naïve café résumé — “quotes” Ünïcödé Ελληνικά русский",
    " leading space",
    "",
]


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_transformers(chat_ggufs, chat_model, tmp_path, llama_cpp):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    gguf_file = chat_ggufs["f32"][0]
    for text in TEXTS:
        assert unicodedata.normalize("NFKC", text) == text, text
        assert llama_cpp.tokenize(gguf_file, text, tmp_path) == tokenizer(text)["input_ids"], text
    # What the export says about NFKC is true: text that normalisation changes may tokenize differently.
    folded = "３…ﬁ"  # full-width 3, an ellipsis, a ligature: NFKC makes them "3...fi"
    assert llama_cpp.tokenize(gguf_file, folded, tmp_path) != tokenizer(folded)["input_ids"]
    assert "llama.cpp does not" in chat_ggufs["f32"][1].stdout


def hf_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, suppress: list[int] | None = None):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, suppress_tokens=suppress)
    return out[0].tolist()


@pytest.mark.slow
def test_greedy_continuations_match_transformers(chat_ggufs, chat_model, tmp_path, llama_cpp):
    """f32 token for token; f16 and q8_0 on the first tokens. Both sides ban the end tokens (llama.cpp's
    --ignore-eos, transformers' suppress_tokens), so every continuation runs its full length."""
    tokenizer, model = AutoTokenizer.from_pretrained(chat_model), AutoModelForCausalLM.from_pretrained(chat_model)
    prompts = ["Return a copy of the", "def main():\n    ",
               tokenizer.apply_chat_template([{"role": "user", "content": "What does list.append() do?"}],
                                             tokenize=False, add_generation_prompt=True)]
    new = 24
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        expected = hf_greedy(model, tokenizer, prompt_ids, new, suppress=[EOS, IM_END])
        assert len(expected) == len(prompt_ids) + new
        continuations = {}
        for outtype in ("f32", "f16", "q8_0"):
            got = llama_cpp.complete(chat_ggufs[outtype][0], prompt, new, tmp_path, "-no-cnv", "--ignore-eos")
            assert got[:len(prompt_ids)] == prompt_ids, outtype
            continuations[outtype] = got[len(prompt_ids):]
        assert continuations["f32"] == expected[len(prompt_ids):], prompt
        for outtype in ("f16", "q8_0"):
            assert continuations[outtype][:4] == expected[len(prompt_ids):][:4], (outtype, prompt)
    assert len(set(expected[len(prompt_ids):])) >= 4  # a continuation worth comparing, not one repeated token


@pytest.mark.slow
def test_a_chat_turn_through_the_gguf_template_stops_at_im_end(chat_ggufs, chat_model, tmp_path, llama_cpp):
    tokenizer, model = AutoTokenizer.from_pretrained(chat_model), AutoModelForCausalLM.from_pretrained(chat_model)
    limit = 48
    for question in ("What does str.upper() do?", "What does list.append() do?", "What does abs() do?"):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=True)["input_ids"]
        expected = hf_greedy(model, tokenizer, prompt_ids, limit)  # stops at <|im_end|> (generation_config)
        reply = expected[len(prompt_ids):]
        assert reply[-1] == IM_END and len(reply) < limit, tokenizer.decode(reply)
        got = llama_cpp.chat_turn(chat_ggufs["f32"][0], question, limit, tmp_path)
        # llama.cpp rendered the same prompt from the GGUF's template, gave the same reply, and ended
        # the turn at <|im_end|>, far short of its token limit.
        assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))


@pytest.mark.slow
def test_smaller_types_come_from_llama_quantize(chat_ggufs, chat_model, tmp_path, llama_cpp):
    path = chat_ggufs["q4_K_M"][0]
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    kinds = {tensor.tensor_type.name for tensor in reader.tensors}
    assert kinds & {"Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "Q4_0"}  # whatever mix llama-quantize chose
    assert path.stat().st_size < chat_ggufs["q8_0"][0].stat().st_size
    assert path.with_name("chat-q4_K_M.Modelfile").is_file()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no intermediate left
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    prompt = "Return a copy of the"
    got = llama_cpp.complete(path, prompt, 8, tmp_path, "-no-cnv", "--ignore-eos")
    assert got[:len(tokenizer(prompt)["input_ids"])] == tokenizer(prompt)["input_ids"] and len(got) > 8


@pytest.mark.slow
def test_other_models_go_to_llama_cpps_converter(tmp_path, llama_cpp, docs_corpus, base_model):
    """A LLaMA with a SentencePiece tokenizer (as the original LLaMA's) is converted by llama.cpp's
    convert_hf_to_gguf.py and tokenizes as in transformers; a Qwen2 with our fresh BPE vocabulary is
    one the converter cannot name, and that is one line."""
    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(json.loads(line)["text"].replace("\n", " ")
                                for line in docs_corpus.read_text().splitlines()))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                             model_type="bpe", byte_fallback=True, minloglevel=2)
    model_dir = tmp_path / "sp-llama"
    model_dir.mkdir()
    (tmp_path / "sp.model").rename(model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))  # as the original LLaMA's tokenizer does
    LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(model_dir)
    result = run_script("export.py", "--model", model_dir, "--format", "gguf", "--outtype", "f16",
                        "--output", tmp_path / "sp.gguf", "--llama_cpp", llama_cpp.source)
    assert_succeeded(result)
    assert "Converted with llama.cpp's convert_hf_to_gguf.py" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS[:4]:
        assert llama_cpp.tokenize(tmp_path / "sp.gguf", text, tmp_path) == tokenizer(text)["input_ids"], text

    tiny_qwen2(tmp_path / "qwen", base_model)
    refused = run_script("export.py", "--model", tmp_path / "qwen", "--format", "gguf", "--output",
                         tmp_path / "qwen.gguf", "--llama_cpp", llama_cpp.source)
    assert_clean_error(refused, "its model_type is qwen2", "llama.cpp's converter refused it",
                       "BPE pre-tokenizer was not recognized")
    assert not list(tmp_path.glob("*qwen.gguf*"))


# ====================================================================== 4-bit GPTQ and AWQ (slow)


LOAD_AND_COMPARE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
original, tokenizer = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("The str.upper() method returns a copy of the string converted to uppercase.", return_tensors="pt")
report = {}
for folder in sys.argv[2:]:
    quantized = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        a, b = original(**ids).logits.flatten(), quantized(**ids).logits.flatten()
    report[folder] = {"layer": type(quantized.model.layers[0].self_attn.q_proj).__name__,
                      "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
                      "config": quantized.config.quantization_config.to_dict(),
                      "chat_template": AutoTokenizer.from_pretrained(folder).chat_template == tokenizer.chat_template}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def model_for_4bit(tmp_path_factory, tokenizer_dir) -> Path:
    """A 128-wide LLaMA: AWQ's clipping search in GPTQModel works on output widths that are multiples of 64,
    and the tiny preset's key/value width is 32."""
    output = tmp_path_factory.mktemp("4bit") / "model"
    assert_succeeded(run_main_in_process("init_model.py", "--tokenizer_name", tokenizer_dir, "--config_name", "tiny",
                                         "--config_overrides", "hidden_size=128,intermediate_size=256,head_dim=32",
                                         "--output_dir", output))
    return output


@pytest.fixture(scope="module")
def quantize_env_python() -> Path:
    require_slow("installs the quantize extra into an environment of its own (once per test venv)")
    return quantize_python()


@pytest.mark.slow
def test_gptq_and_awq_calibrate_on_cpu_and_load_in_transformers(model_for_4bit, chat_file, tmp_path,
                                                                 quantize_env_python, base_model):
    # hidden 64 and MLP 176 (the tiny preset) are not whole groups of 128 weights: refused before loading
    refused = run_job([quantize_env_python, REPO / "export.py", "--model", base_model, "--format", "gptq",
                       "--calibration_files", chat_file, "--output_dir", tmp_path / "nope"], cwd=tmp_path)
    assert_clean_error(refused, "--group_size 128 does not divide the model's hidden_size (64)", "--group_size")
    folders = {}
    for method in ("gptq", "awq"):
        folders[method] = tmp_path / method
        result = run_job([quantize_env_python, REPO / "export.py", "--model", model_for_4bit, "--format", method,
                          "--calibration_files", chat_file, "--calibration_samples", "32", "--group_size", "32",
                          "--output_dir", folders[method]], cwd=tmp_path)
        assert_succeeded(result)
        assert f"Calibrating {method.upper()} 4-bit (group size 32) on 32 samples" in result.stdout
        assert (folders[method] / "model.safetensors").stat().st_size < \
            0.5 * (model_for_4bit / "model.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "gptq"]  # nothing else, no logs/ folder
    check = subprocess.run([quantize_env_python, "-c", LOAD_AND_COMPARE, model_for_4bit, *folders.values()],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    for method, folder in folders.items():
        loaded = report[str(folder)]
        assert loaded["config"]["quant_method"] == method and loaded["config"]["bits"] == 4
        assert loaded["layer"] != "Linear"  # a 4-bit kernel, not a dequantized copy
        assert loaded["cosine"] > 0.95, loaded  # the same model, within 4-bit rounding
        assert loaded["chat_template"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM and GPTQModel's CUDA kernels need a GPU")
def test_4bit_exports_serve_on_a_gpu(model_for_4bit, chat_file, tmp_path, quantize_env_python):
    """On a GPU: GPTQ and AWQ with GPTQModel's CUDA kernels, then loaded by vLLM where it is installed
    (else by transformers on the GPU) and asked for a few tokens."""
    for method in ("gptq", "awq"):
        folder = tmp_path / method
        assert_succeeded(run_job([quantize_env_python, REPO / "export.py", "--model", model_for_4bit, "--format",
                                  method, "--calibration_files", chat_file, "--group_size", "32",
                                  "--output_dir", folder]))
        serve = subprocess.run([quantize_env_python, "-c", SERVE_ON_GPU, str(folder)], capture_output=True,
                               text=True, timeout=900)
        assert serve.returncode == 0, serve.stderr[-3000:]
        assert len(json.loads(serve.stdout.strip().splitlines()[-1])) == 4


SERVE_ON_GPU = """
import json, sys
try:
    import vllm
except ImportError:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cuda")
    ids = AutoTokenizer.from_pretrained(sys.argv[1])("Return a copy", return_tensors="pt").to("cuda")
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
    print(json.dumps(out.tolist()))
else:  # vLLM reads the 4-bit format from the folder's config
    llm = vllm.LLM(sys.argv[1], enforce_eager=True, gpu_memory_utilization=0.2)
    out = llm.generate(["Return a copy"], vllm.SamplingParams(max_tokens=4, min_tokens=4, temperature=0))
    print(json.dumps(list(out[0].outputs[0].token_ids)))
"""
