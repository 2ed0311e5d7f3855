"""Export a trained model (or a LoRA adapter, folded into its base first) for other tools.

    python export.py --adapter out/lora --output_dir out/merged            # a plain HF folder, no PEFT needed
    python export.py --base out/pt --adapter out/lora --output_dir out/merged
    python export.py --adapter out/rm-lora --output_dir out/rm      # a reward model's adapter + score head

    # GGUF for llama.cpp, Ollama, LM Studio (+ out/sft.Modelfile for `ollama create`)
    python export.py --model out/sft --format gguf --outtype f16 --output out/sft.gguf       # f32 f16 bf16 q8_0
    python export.py --model out/lora --format gguf --outtype q4_K_M --output out/sft-q4.gguf \\
        --llama_quantize ~/llama.cpp/build/bin/llama-quantize                               # any llama-quantize type

    # 4-bit for GPU serving (vLLM, transformers): pip install -e ".[quantize]"
    python export.py --model out/sft --format gptq --calibration_files sft.jsonl --output_dir out/sft-gptq
    python export.py --model out/sft --format awq --calibration_files sft.jsonl --output_dir out/sft-awq
"""

import argparse
from pathlib import Path

from dstrain.cli import cli_entry
from dstrain.errors import UserError
from dstrain.export.formats import check_4bit_request, check_gguf_request, export_4bit, export_gguf
from dstrain.export.merge import merge_adapter, plain_model_folder


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the model folder to export, or a LoRA adapter folder (merged first)")
    parser.add_argument("--adapter", help="a PEFT adapter folder lora.py wrote (the same as --model for one)")
    parser.add_argument("--base", help="an adapter's base model folder; defaults to the one the adapter names")
    parser.add_argument("--format", choices=["hf", "gguf", "gptq", "awq"], default="hf",
                        help="hf: a plain HF folder (merges an adapter); gguf: one GGUF file; gptq, awq: 4-bit folders")
    parser.add_argument("--output_dir", help="the folder to write (hf, gptq, awq)")
    parser.add_argument("--output", help="the .gguf file to write (gguf)")
    gguf = parser.add_argument_group("gguf")
    gguf.add_argument("--outtype", default="f16",
                      help="f32, f16, bf16, q8_0 (written here), or any llama-quantize type: q4_K_M, q5_K_M, q6_K, ...")
    gguf.add_argument("--llama_quantize", help="llama.cpp's llama-quantize binary (default: the one on PATH)")
    gguf.add_argument("--llama_cpp", help="a llama.cpp checkout, whose convert_hf_to_gguf.py converts models "
                                          "this project did not train")
    four_bit = parser.add_argument_group("gptq, awq")
    four_bit.add_argument("--calibration_files", nargs="+", help="JSONL conversations or text (as for training)")
    four_bit.add_argument("--calibration_samples", type=int, default=128, help="records drawn from them (128)")
    four_bit.add_argument("--calibration_length", type=int, default=512, help="tokens kept per sample (512)")
    four_bit.add_argument("--group_size", type=int, default=128, help="weights sharing one scale (128)")
    four_bit.add_argument("--text_field", default="text", help="the text field of non-chat JSONL records")
    four_bit.add_argument("--seed", type=int, default=0, help="the calibration sample's seed")
    return parser


@cli_entry
def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.model and args.adapter:
        raise UserError("give the folder to export once: --model (a model or adapter folder) or --adapter")
    source = args.model or args.adapter
    if source is None:
        raise UserError("--model is required (the model or adapter folder to export)")
    source = Path(source)

    # 1. A plain HF folder: the adapter merged into its base (the default format).
    if args.format == "hf":
        if args.output_dir is None:
            raise UserError("--output_dir is required (the folder to write)")
        merge_adapter(source, Path(args.output_dir), args.base)
        return

    # 2. Refuse what can be refused before any work (a missing tool, a bad output name, no data).
    if args.format == "gguf":
        output = Path(args.output) if args.output else None
        quantizer = check_gguf_request(output, args.outtype, args.llama_quantize)
    else:
        output = Path(args.output_dir) if args.output_dir else None
        check_4bit_request(args.format, output, args.calibration_files)

    # 3. Export from the plain model folder (an adapter is merged into a scratch folder first).
    with plain_model_folder(source, args.base, output.parent) as model_dir:
        if args.format == "gguf":
            export_gguf(model_dir, output, args.outtype, quantizer, args.llama_cpp)
        else:
            export_4bit(model_dir, output, args.format, args.calibration_files, args.calibration_samples,
                        args.calibration_length, args.group_size, args.text_field, args.seed)


if __name__ == "__main__":
    main()
