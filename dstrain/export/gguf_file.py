"""A GGUF file (llama.cpp, Ollama, LM Studio) of a LLaMA model whose tokenizer is byte-level BPE,
written with the `gguf` package's writer.

llama.cpp's own converter (`convert_hf_to_gguf.py`) cannot do this for a tokenizer trained here: it
names a BPE tokenizer's pre-tokenizer by hashing the ids of a fixed probe text and looking the hash
up in a list of published tokenizers, so a new vocabulary is refused ("BPE pre-tokenizer was not
recognized"). Ours is known without a hash: its pre-tokenizer is `ByteLevel(use_regex=True)`,
GPT-2's regex, which llama.cpp implements as pre-tokenizer type `gpt-2`. So this module reads the
pre-tokenizer itself (`llama_cpp_pre_tokenizer`) and writes everything else as the converter would
(key and tensor names from `gguf`'s own tables; layout facts, such as the RoPE row order, below).

Tensors are streamed: the tensor table is written from the safetensors headers, then each tensor
is read, converted and written in turn, so memory holds one tensor at a time. The file appears
under its name only when complete (written beside it, then renamed).
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from dstrain.data.chat_template import end_of_turn_id, has_chat_template
from dstrain.errors import UserError

# The types written here (the set); every other llama.cpp type goes through llama-quantize.
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
NFKC_NOTICE = ("the tokenizer applies NFKC normalisation and llama.cpp does not: text that is already NFKC-normal "
               "tokenizes identically, other text (full-width punctuation, ligatures such as 'ﬁ', superscripts) "
               "may not")


@dataclass
class GGUFSummary:
    path: Path
    outtype: str
    tensors: int
    kept_wider: list[str]  # tensors q8_0 could not hold (a row not a multiple of 32 values), written as f16
    normalizes: bool
    chat_template: bool


# ---------------------------------------------------------------- what this writer can do


def llama_cpp_pre_tokenizer(tokenizer) -> tuple[str | None, str]:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("gpt-2"), or None and why it is not one
    this writer can name. Only the exact pieces llama.cpp reproduces are accepted: byte-level BPE
    with GPT-2's regex and no prefix space, and no normaliser or NFKC (which llama.cpp leaves out:
    see NFKC_NOTICE)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "it is not a fast (tokenizers) tokenizer"
    spec = json.loads(backend.to_str())
    model, pre, normalizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE":
        return None, f"its tokenizer model is {model.get('type')}, not byte-level BPE"
    extras = [key for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix") if model.get(key)]
    if extras:
        return None, f"its BPE uses {', '.join(extras)}, which GPT-2's byte-level BPE does not"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None, f"its pre-tokenizer {_describe(pre)} is not GPT-2's byte-level one"
    if normalizer is not None and normalizer.get("type") != "NFKC":
        return None, f"its normaliser {_describe(normalizer)} is not one llama.cpp can leave out safely"
    return "gpt-2", ""


def unsupported_model(config) -> str | None:
    """Why the model is not a LLaMA this writer lays out, or None."""
    rope = getattr(config, "rope_parameters", None) or {}
    if getattr(config, "model_type", None) != "llama":
        return f"its model_type is {getattr(config, 'model_type', None)}, not llama"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "it has attention or MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"its activation is {config.hidden_act}, not silu"
    if rope.get("rope_type", "default") not in ("default", "linear"):
        return f"its RoPE scaling is {rope.get('rope_type')}"
    return None


def normalizes(tokenizer) -> bool:
    return json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer") is not None


# ---------------------------------------------------------------- writing


def write_gguf(model_dir: Path, tokenizer, config, output: Path, outtype: str, name: str) -> GGUFSummary:
    """Write `model_dir` (a plain HF LLaMA folder: config and safetensors) as one GGUF file; `name` is
    the model's name in it (general.name)."""
    tensor_type, file_type = OUTTYPES[outtype]
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{config.vocab_size} embedding rows")
    sources = _safetensors_index(model_dir)
    planned = [_plan(hf_name, shape, tensor_type, config) for hf_name, (_, shape) in sources.items()]
    planned = [plan for plan in planned if plan is not None]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(staging, "llama")
    try:
        _add_model_metadata(writer, config, file_type, name)
        template = _add_vocabulary(writer, tokenizer, config)
        for plan in planned:
            writer.add_tensor_info(plan.gguf_name, plan.byte_shape, np.dtype(plan.numpy_dtype), plan.nbytes,
                                   raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles = {}
        for plan in planned:
            file = sources[plan.hf_name][0]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt")
            writer.write_tensor_data(_convert(handles[file].get_tensor(plan.hf_name), plan, config))
        writer.close()
        os.replace(staging, output)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return GGUFSummary(output, outtype, len(planned), [p.hf_name for p in planned if p.kept_wider],
                       normalizes(tokenizer), template)


def _safetensors_index(model_dir: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every weight's file and shape, read from the safetensors headers (no tensor data)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights (save the model with save_pretrained, "
                        "safe_serialization on)")
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                index[name] = (file, list(handle.get_slice(name).get_shape()))
    return index


@dataclass
class _TensorPlan:
    hf_name: str
    gguf_name: str
    shape: list[int]
    qtype: gguf.GGMLQuantizationType
    kept_wider: bool

    @property
    def numpy_dtype(self):
        return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            self.qtype, np.uint8)

    @property
    def byte_shape(self) -> list[int]:
        if self.numpy_dtype is not np.uint8:
            return list(self.shape)
        return list(gguf.quants.quant_shape_to_byte_shape(tuple(self.shape), self.qtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape)) * np.dtype(self.numpy_dtype).itemsize


def _plan(hf_name: str, shape: list[int], tensor_type, config) -> _TensorPlan | None:
    if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return None  # tied: llama.cpp uses token_embd for the output when output.weight is absent
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UserError(f"weight {hf_name}: not a tensor of llama.cpp's LLaMA layout")
    qtype, kept_wider = tensor_type, False
    if len(shape) < 2:
        qtype = gguf.GGMLQuantizationType.F32  # norms stay f32, as llama.cpp's converter keeps them
    elif tensor_type == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[tensor_type][0]:
        qtype, kept_wider = gguf.GGMLQuantizationType.F16, True  # a row must be whole 32-value blocks
    return _TensorPlan(hf_name, gguf_name, shape, qtype, kept_wider)


def _convert(tensor: torch.Tensor, plan: _TensorPlan, config) -> np.ndarray:
    tensor = tensor.to(torch.float32)
    # HF's LLaMA rotates the two halves of each head (rotate_half); llama.cpp's LLaMA rotates
    # adjacent pairs. Reordering each head's rows from [first half, second half] to interleaved
    # pairs makes the two compute the same attention.
    if plan.hf_name.endswith("self_attn.q_proj.weight"):
        tensor = _interleave_rope_rows(tensor, config.num_attention_heads)
    elif plan.hf_name.endswith("self_attn.k_proj.weight"):
        tensor = _interleave_rope_rows(tensor, config.num_key_value_heads)
    return gguf.quants.quantize(tensor.numpy(), plan.qtype)


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _add_model_metadata(writer, config, file_type, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocabulary(writer, tokenizer, config) -> bool:
    """Tokens, their types, merges, the special tokens and the chat template; True if a template was written."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for token_id in range(config.vocab_size):
        if token_id >= len(tokenizer):  # rows padded past the vocabulary (--pad_vocab_size_to_multiple_of)
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tokenizer.convert_ids_to_tokens(token_id))
        if token_id in added:
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(tokenizer)[0])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    with_specials, without = tokenizer("x").input_ids, tokenizer("x", add_special_tokens=False).input_ids
    writer.add_add_bos_token(len(with_specials) > len(without) and with_specials[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(with_specials) > len(without) and with_specials[-1] == tokenizer.eos_token_id)
    if not has_chat_template(tokenizer):
        return False
    end_of_turn = end_of_turn_id(tokenizer)
    if end_of_turn != tokenizer.eos_token_id:
        writer.add_eot_token_id(end_of_turn)  # <|im_end|>: llama.cpp ends a chat turn (and generation) there
    writer.add_chat_template(portable_chat_template(tokenizer))
    return True


GENERATION_MARKER = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def portable_chat_template(tokenizer) -> str:
    """The chat template with transformers' `{% generation %}` markers taken out when that renders the
    same text. The markers only delimit the replies for SFT's loss mask; llama.cpp skips them, but
    other GGUF readers run the template in plain Jinja (llama-cpp-python, LM Studio), which knows no
    such tag and would refuse the whole template."""
    template = tokenizer.chat_template
    stripped = GENERATION_MARKER.sub("", template)
    if stripped == template:
        return template
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    for messages, cue in ((probe, True), (probe[:3], False)):
        if tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=cue) != \
                tokenizer.apply_chat_template(messages, chat_template=stripped, tokenize=False,
                                              add_generation_prompt=cue):
            return template
    return stripped


def _describe(piece: dict) -> str:
    return json.dumps({key: value for key, value in piece.items() if key != "pretokenizers"}, sort_keys=True)[:120]
