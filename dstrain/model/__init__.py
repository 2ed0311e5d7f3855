"""The model: its config derived from the tokenizer, loading it and its tokenizer, LoRA/QLoRA adapters."""
