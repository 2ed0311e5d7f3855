"""The tokenizer's chat template: rendering conversations to token ids, which of them are the
assistant's (the SFT loss mask), and the token that ends an assistant turn. Every stage that
renders a chat uses these functions: SFT rows, preference pairs, the data audit, generation,
serving and reward scoring, so a conversation is the same tokens in training and at inference.

Which tokens are the assistant's. Two ways, both by position (never by searching the text, so
content that looks like template markup, `<|im_start|>assistant`, cannot move the mask):
- templates with `{% generation %}` markers (this project's tokenizers, and any whose template
  has them): the template's own mask, `apply_chat_template(return_assistant_tokens_mask=True)`;
- other templates (most published ones, e.g. Qwen2.5, Llama 3, Mistral): each assistant turn is
  located by rendering the conversation up to it with the generation prompt and again with the
  reply; the tokens in between, up to and including the last special token among them (the
  end-of-turn token), are the reply. A template whose rendering of a beginning is not a prefix
  of the whole (it rewrites earlier turns) is refused with a clear error.
"""

from transformers import GenerationConfig

from dstrain.errors import UserError

IGNORE = -100  # the label of a position the loss skips (PyTorch's cross-entropy ignore_index)
# Long conversations are fitted to max_length by the callers; the tokenizer's warning that a
# sequence exceeds model_max_length would only mislead.
QUIET = {"verbose": False}
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer.chat_template)


def require_chat_template(tokenizer, where: str) -> None:
    if not has_chat_template(tokenizer):
        raise UserError(f"{where}: the tokenizer has no chat template; train one with tokenizer.py (ChatML) "
                        "or use a model that ships one")


def has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "generation %}" in template and "endgeneration" in template


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """The conversation's token ids through the template (with the assistant's cue when asked)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tokenizer_kwargs=QUIET,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside the assistant replies."""
    if has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True, tokenizer_kwargs=QUIET)
        ids = list(encoded["input_ids"])
        return ids, [token if keep else IGNORE for token, keep in zip(ids, encoded["assistant_masks"])]
    return _tokenize_by_prefixes(tokenizer, messages)


def _tokenize_by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids = render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    special = set(tokenizer.all_special_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:turn], add_generation_prompt=True)
        through = render(tokenizer, messages[:turn + 1], add_generation_prompt=False)
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise UserError("the chat template renders a conversation's beginning differently from the whole "
                            "conversation, so the assistant tokens cannot be located; use a template with "
                            "{% generation %} markers")
        reply = list(range(len(before), len(through)))
        closing = [i for i in reply if ids[i] in special]
        end = closing[-1] + 1 if closing else len(through)  # through the end-of-turn token, not past it
        for i in range(len(before), end):
            labels[i] = ids[i]
    return ids, labels


# ---------------------------------------------------------------- the end of an assistant turn


def closing_token(tokenizer) -> int | None:
    """The last special token the template puts after an assistant reply's text (ChatML's
    <|im_end|>), read off a rendering; None when it puts none there. The data audit checks that
    the loss mask trains it and that generation stops at it."""
    before, through = render(tokenizer, PROBE[:1], True), render(tokenizer, PROBE, False)
    special = set(tokenizer.all_special_ids)
    closing = [token for token in through[len(before):] if token in special]
    return closing[-1] if closing else None


def end_of_turn_id(tokenizer) -> int:
    """The token a trained chat model emits to end its turn: the last token the loss mask trains
    in a reply when it is a special one (<|im_end|> for ChatML), else eos. A template that leaves
    its closing token out of the mask never teaches the model to emit it, so generation then
    stops at eos (and the data audit names the template)."""
    _, labels = tokenize_conversation(tokenizer, PROBE)
    trained = [label for label in labels if label != IGNORE]
    special = set(tokenizer.all_special_ids)
    return trained[-1] if trained and trained[-1] in special else tokenizer.eos_token_id


def set_chat_stops(generation_config: GenerationConfig, tokenizer) -> None:
    """Stop generating at the end of an assistant turn, not only at eos."""
    generation_config.eos_token_id = list(dict.fromkeys([end_of_turn_id(tokenizer), tokenizer.eos_token_id]))
    generation_config.pad_token_id = tokenizer.pad_token_id


def configure_chat_generation(model, tokenizer) -> None:
    """Make the saved model's `generate` end an assistant turn (sft.py, lora.py, dpo.py)."""
    set_chat_stops(model.generation_config, tokenizer)
