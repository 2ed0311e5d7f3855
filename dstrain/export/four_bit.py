"""4-bit GPTQ and AWQ checkpoints for GPU serving (vLLM loads both natively; transformers loads them
with GPTQModel and optimum installed), through GPTQModel.

Why GPTQModel and not llm-compressor: both are maintained and both write folders vLLM serves, but
llm-compressor 0.14 pins transformers<=5.17 (this project pins 5.23), while GPTQModel 7.6.0 installs
beside torch 2.13 and transformers 5.23 as they are, does GPTQ and AWQ in one API, and runs both on
CPU. (GPTQModel 7.7 needs torch 2.14.1, hence the pin.) It is an optional extra:
`pip install -e ".[quantize]"`.
"""

import contextlib
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from dstrain.errors import UserError

METHODS = ("gptq", "awq")


def require_gptqmodel(method: str) -> None:
    missing = [name for name in ("gptqmodel", "optimum") if find_spec(name) is None]
    if missing:
        raise UserError(f"--format {method} needs GPTQModel and optimum ({', '.join(missing)} missing): "
                        "pip install -e \".[quantize]\"")


def check_group_size(model_dir: Path, group_size: int) -> None:
    """Every quantized layer's input width must be whole groups; say so before loading anything."""
    config = AutoConfig.from_pretrained(model_dir)
    widths = {"hidden_size": config.hidden_size, "intermediate_size": getattr(config, "intermediate_size", None)}
    for name, width in widths.items():
        if width and width % group_size:
            fits = [size for size in (128, 64, 32) if all(w % size == 0 for w in widths.values() if w)]
            hint = f"--group_size {fits[0]}" if fits else "a smaller --group_size"
            raise UserError(f"--group_size {group_size} does not divide the model's {name} ({width}); use {hint}")


def quantize_4bit(model_dir: Path, tokenizer, output_dir: Path, method: str, samples: list[dict],
                  group_size: int, batch_size: int = 4) -> Path:
    """Calibrate on `samples` and write the 4-bit folder; it appears under its name only when complete."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # GPTQModel 7.6 sizes its CPU worker pool at half the cores and then asks it for 2 loader
    # workers, which fails on a 2-core machine ("requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # optional: imported only when asked for

    config = QuantizeConfig(bits=4, group_size=group_size, quant_method=method)
    # AWQ: GPTQModel picks its CUDA GEMM kernel unless told otherwise; its torch kernel writes the
    # same GEMM-format checkpoint and runs on CPU.
    backend = BACKEND.AWQ_TORCH if method == "awq" and device == "cpu" else BACKEND.AUTO
    model_dir, output_dir = model_dir.resolve(), output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}-", dir=output_dir.parent) as scratch, \
            contextlib.chdir(scratch):  # GPTQModel writes a logs/ folder into the working directory
        staging = Path(scratch) / "out"
        model = GPTQModel.load(str(model_dir), config, device=device)
        model.quantize(samples, batch_size=batch_size, backend=backend)
        model.save(str(staging))
        # The folder's tokenizer and chat stops are the model's own, whatever GPTQModel's saver wrote.
        tokenizer.save_pretrained(staging)
        if (model_dir / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
        shutil.move(str(staging), output_dir)
    return output_dir


def folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*.safetensors"))
