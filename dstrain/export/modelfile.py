"""The Ollama Modelfile beside a GGUF, so `ollama create NAME -f <gguf stem>.Modelfile` works as written.

Ollama does not run the GGUF's Jinja template: its prompts come from the Modelfile's TEMPLATE, in
Go's text/template language. For a ChatML model (every chat model this project trains) that is the
template below, which renders each message as `<|im_start|>role\\ncontent<|im_end|>\\n` and ends with
the assistant's cue, exactly as the tokenizer's template does with add_generation_prompt; the
turn ends at `<|im_end|>` (PARAMETER stop). Whether a tokenizer's template is ChatML is read off a
rendering, not its source text.
"""

from pathlib import Path

from dstrain.data.chat_template import has_chat_template

CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
CHATML_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]


def chatml_rendering(messages: list[dict]) -> str:
    """What CHATML_GO_TEMPLATE renders for `messages` (Ollama's .Messages), the assistant's cue last."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def is_chatml(tokenizer) -> bool:
    if not has_chat_template(tokenizer):
        return False
    rendered = tokenizer.apply_chat_template(CHATML_PROBE, tokenize=False, add_generation_prompt=True)
    return rendered == chatml_rendering(CHATML_PROBE)


def modelfile_text(gguf_name: str, tokenizer, context_length: int | None) -> str:
    lines = [f"# Ollama: ollama create <name> -f {Path(gguf_name).stem}.Modelfile",
             f"FROM ./{gguf_name}"]
    if is_chatml(tokenizer):
        lines += [f'TEMPLATE """{CHATML_GO_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    elif has_chat_template(tokenizer):
        # Not ChatML: Ollama reads the GGUF's template and uses it when it knows it.
        lines.insert(1, "# The chat template is not ChatML: Ollama picks a template from the GGUF's own.")
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""']  # a base model: plain continuation
    if context_length:
        # Ollama's default context may exceed what the model was trained for.
        lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer, context_length: int | None) -> Path:
    path = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    path.write_text(modelfile_text(gguf_path.name, tokenizer, context_length), encoding="utf-8")
    return path
