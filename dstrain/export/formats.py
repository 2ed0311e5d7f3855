"""Each export format from a plain model folder to its files, with what the user needs to know printed:
GGUF (+ the Ollama Modelfile) and the 4-bit GPU checkpoints. export.py calls these in order."""

from pathlib import Path

from transformers import AutoConfig

from dstrain.errors import UserError
from dstrain.export.calibration import calibration_samples
from dstrain.export.four_bit import check_group_size, folder_size, quantize_4bit, require_gptqmodel
from dstrain.export.gguf_file import (
    NFKC_NOTICE,
    OUTTYPES,
    llama_cpp_pre_tokenizer,
    normalizes,
    unsupported_model,
    write_gguf,
)
from dstrain.export.llama_cpp import convert_with_llama_cpp, find_llama_quantize, quantize_gguf
from dstrain.export.modelfile import write_modelfile
from dstrain.model.loading import context_length, load_tokenizer


def check_gguf_request(output: Path | None, outtype: str, llama_quantize: str | None) -> Path | None:
    """Everything about a GGUF request that can be refused before any work: the output's name and,
    for the types llama.cpp's quantizer makes, that the quantizer is there."""
    if output is None or output.suffix != ".gguf":
        raise UserError(f"--format gguf: --output must name a .gguf file, got {output}")
    return None if outtype in OUTTYPES else find_llama_quantize(llama_quantize, outtype)


def export_gguf(model_dir: Path, output: Path, outtype: str, quantizer: Path | None, llama_cpp: str | None) -> None:
    tokenizer, config = load_tokenizer(str(model_dir)), AutoConfig.from_pretrained(model_dir)
    why_not_ours = unsupported_model(config) or llama_cpp_pre_tokenizer(tokenizer)[1] or None
    # llama-quantize starts from a GGUF that holds the checkpoint's values exactly.
    first_type = outtype if quantizer is None else _lossless_type(config)
    first = output if quantizer is None else output.with_name(f".{output.stem}.{first_type}.tmp.gguf")
    try:
        if why_not_ours:
            convert_with_llama_cpp(llama_cpp, model_dir, first, first_type, why_not_ours)
            print(f"Converted with llama.cpp's convert_hf_to_gguf.py ({why_not_ours})")
        else:
            summary = write_gguf(model_dir, tokenizer, config, first, first_type, name=output.stem)
            if summary.kept_wider:
                print(f"{len(summary.kept_wider)} tensors have rows that are not whole q8_0 blocks of 32 values "
                      f"and stay f16: {', '.join(summary.kept_wider)}")
        if quantizer is not None:
            quantize_gguf(quantizer, first, output, outtype)
    finally:
        if quantizer is not None:
            first.unlink(missing_ok=True)
    modelfile = write_modelfile(output, tokenizer, context_length(config))
    print(f"Wrote {output} ({outtype}, {output.stat().st_size / 2**20:.1f} MiB) and {modelfile}")
    if not why_not_ours and normalizes(tokenizer):
        print(f"Note: {NFKC_NOTICE}.")
    print(f"Run it: llama-cli -m {output}    |    ollama create {output.stem} -f {modelfile}")


def _lossless_type(config) -> str:
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "f16", "float16": "f16"}.get(dtype, "f32")


def check_4bit_request(method: str, output_dir: Path | None, calibration_files: list[str] | None) -> None:
    if output_dir is None:
        raise UserError(f"--format {method} needs --output_dir (the folder to write)")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} is not empty; choose a new folder")
    if not calibration_files:
        raise UserError(f"--format {method} calibrates on your data: pass --calibration_files (JSONL conversations "
                        "or text, as for training)")
    require_gptqmodel(method)


def export_4bit(model_dir: Path, output_dir: Path, method: str, calibration_files: list[str], samples: int,
                max_length: int, group_size: int, text_field: str, seed: int) -> None:
    check_group_size(model_dir, group_size)
    tokenizer = load_tokenizer(str(model_dir))
    sample = calibration_samples(calibration_files, tokenizer, samples, max_length, text_field, seed)
    tokens = sum(len(item["input_ids"]) for item in sample)
    print(f"Calibrating {method.upper()} 4-bit (group size {group_size}) on {len(sample)} samples, {tokens:,} tokens")
    quantize_4bit(model_dir, tokenizer, output_dir, method, sample, group_size)
    print(f"Wrote {output_dir}: {folder_size(model_dir) / 2**20:.1f} MiB of weights -> "
          f"{folder_size(output_dir) / 2**20:.1f} MiB. Serve it: vllm serve {output_dir}")
