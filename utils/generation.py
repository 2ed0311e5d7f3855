"""Text generation from a saved model folder; shared by the demo and the inference commands."""

import torch
from transformers import AutoModelForCausalLM

from utils.errors import UserError
from utils.modeling import load_tokenizer


def load_for_inference(model_dir: str, trust_remote_code: bool = False):
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a model from {model_dir}: {str(error).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int = 0) -> str:
    """The continuation of `prompt` (without the prompt itself)."""
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
