"""llama.cpp's own tools, where they do the work: `llama-quantize` for the smaller GGUF types (q4_K_M,
q5_K_M, q6_K, ...; their block formats and mixes are llama.cpp's, never re-implemented here), and
`convert_hf_to_gguf.py` for a model this project did not train."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dstrain.errors import UserError


def find_llama_quantize(given: str | None, outtype: str) -> Path:
    """The llama-quantize binary: the one given, else the one on PATH; one clear line without it."""
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserError(f"--llama_quantize {given}: not an executable file")
        return path
    found = shutil.which("llama-quantize")
    if found is None:
        raise UserError(f"--outtype {outtype} needs llama.cpp's llama-quantize, which is not on PATH: install "
                        "llama.cpp (or build it: cmake --build build --target llama-quantize) and pass "
                        "--llama_quantize <path>, or use --outtype f32, f16, bf16 or q8_0, which need no llama.cpp")
    return Path(found)


def quantize_gguf(binary: Path, source: Path, output: Path, outtype: str) -> None:
    """`llama-quantize source output TYPE`, written beside `output` and renamed when complete."""
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        result = subprocess.run([str(binary), str(source), str(staging), outtype.upper()],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"llama-quantize could not make {outtype}: {_first_problem(result)}")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)


def convert_with_llama_cpp(checkout: str | None, model_dir: Path, output: Path, outtype: str,
                           why_not_ours: str) -> None:
    """Hand a model this project's writer does not lay out to llama.cpp's converter (which recognises
    published models); one clear line when there is no converter or it refuses the model."""
    if not checkout:
        raise UserError(f"{model_dir}: not a model this exporter writes ({why_not_ours}); llama.cpp's converter may "
                        "know it: pass --llama_cpp <a llama.cpp checkout> to use its convert_hf_to_gguf.py")
    script = Path(checkout) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"--llama_cpp {checkout}: no convert_hf_to_gguf.py there (give the llama.cpp checkout)")
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        result = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(staging),
                                 "--outtype", outtype], check=False, capture_output=True, text=True)
        if result.returncode != 0 or not staging.is_file():
            raise UserError(f"{model_dir}: not a model this exporter writes ({why_not_ours}), and llama.cpp's "
                            f"converter refused it: {_first_problem(result)}")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)


def _first_problem(result: subprocess.CompletedProcess) -> str:
    """The line of a tool's output that says what went wrong (a Python tool's last line is its exception)."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("NotImplementedError", "ValueError", "KeyError", "RuntimeError", "Exception", "OSError")):
            return line
    for line in lines:
        lowered = line.lower()
        if "error" in lowered or "invalid" in lowered or "failed" in lowered or "unknown" in lowered:
            return line
    return lines[-1] if lines else f"exit code {result.returncode}"
