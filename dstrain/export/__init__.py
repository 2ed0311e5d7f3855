"""Export: a trained model (or a LoRA adapter folded into its base) in the formats other tools run.

    merge        an adapter folded into its base: a plain HF folder that loads without PEFT
    gguf_file    a GGUF file of a LLaMA with our byte-level BPE tokenizer, written with the `gguf` package
    llama_cpp    llama.cpp's own tools where they do the work: llama-quantize for the smaller GGUF
                 types, convert_hf_to_gguf.py for models this project did not train
    modelfile    the Ollama Modelfile beside a GGUF
    calibration  a sample of the user's own data, tokenized, for 4-bit calibration
    four_bit     GPTQ and AWQ checkpoints for vLLM and transformers, through GPTQModel

Imports point one way: export uses data (records, chat template) and model (loading, adapters).
"""
