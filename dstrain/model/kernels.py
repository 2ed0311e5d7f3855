"""Which fast kernels a run gets: the attention implementation (--attn_implementation auto), and the
checks that refuse GPU-only kernels (Liger, flash attention) in one line where they cannot run.

transformers does the work itself (its flash-attention integrations, `use_liger_kernel`, `torch_compile`);
what it lacks is the choice: its default is sdpa even where flash attention is installed and the GPU
supports it, and a flash or Liger request on a machine without them fails deep inside model loading.
"""

import torch
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_liger_kernel_available

from dstrain.errors import UserError

FLASH = ("flash_attention_2", "flash_attention_3")
GPU_EXTRA = "pip install -e '.[gpu]'"


def _capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _flash_ready(kind: str, capability) -> bool:
    if capability is None:
        return False
    if kind == "flash_attention_3":  # Hopper (sm_90) and later
        return capability >= (9, 0) and is_flash_attn_3_available()
    return capability >= (8, 0) and is_flash_attn_2_available()  # Ampere and later


def choose_attention(requested: str | None) -> tuple[str | None, str]:
    """(the attn_implementation to build the model with, a line saying which and why). "auto" (and None):
    flash attention 3 on Hopper with flash-attn-3 installed, else 2 on Ampere or later with flash-attn,
    else sdpa (None: transformers' own default, sdpa wherever the model supports it)."""
    capability = _capability()
    if requested not in (None, "auto"):
        if requested in FLASH and not _flash_ready(requested, capability):
            need = "Hopper (sm_90) GPU and the flash-attn-3 package" if requested == "flash_attention_3" else \
                "Ampere or newer GPU (sm_80+) and the flash-attn package"
            have = "no GPU here" if capability is None else f"this GPU is sm_{capability[0]}{capability[1]}"
            raise UserError(f"--attn_implementation {requested} needs an {need} ({have}; {GPU_EXTRA}); "
                            "use sdpa or auto")
        return requested, f"Attention: {requested} (--attn_implementation {requested})"
    if capability is None:
        return None, "Attention: sdpa (--attn_implementation auto: no GPU)"
    gpu = f"sm_{capability[0]}{capability[1]}"
    for kind in reversed(FLASH):
        if _flash_ready(kind, capability):
            return kind, f"Attention: {kind} (--attn_implementation auto: {gpu}, package installed)"
    why = "flash-attn is not installed" if capability >= (8, 0) else "flash attention needs sm_80 or newer"
    return None, f"Attention: sdpa (--attn_implementation auto: {gpu}, {why}; {GPU_EXTRA})"


def check_liger(use_liger_kernel: bool) -> None:
    """--use_liger_kernel: transformers patches the model with Liger's Triton kernels, which need a GPU."""
    if not use_liger_kernel:
        return
    if not torch.cuda.is_available():
        raise UserError("--use_liger_kernel needs a GPU (Liger's kernels are Triton GPU kernels); leave it out on CPU")
    if not is_liger_kernel_available():
        raise UserError(f"--use_liger_kernel needs the liger-kernel package: {GPU_EXTRA}")
