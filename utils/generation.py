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
def _generate(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
              seed: int) -> str:
    """Decoded new tokens only. Stops where the model's generation_config says (after SFT:
    at the end of the assistant turn as well as at eos)."""
    torch.manual_seed(seed)
    input_ids = input_ids.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int = 0) -> str:
    """The continuation of `prompt` (without the prompt itself)."""
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return _generate(model, tokenizer, input_ids, max_new_tokens, temperature, top_p, seed)


def chat_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.7,
               top_p: float = 0.95, seed: int = 0) -> str:
    """The assistant's next turn, through the tokenizer's chat template."""
    if not tokenizer.chat_template:
        raise UserError("this model's tokenizer has no chat template; use --prompt instead")
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    return _generate(model, tokenizer, input_ids, max_new_tokens, temperature, top_p, seed).strip()
