"""dstrain: what the entry scripts stand on, in packages named after what flows through them.

    cli, arguments, errors   every command's arguments (pure dataclasses) and its one-line errors
    distributed              ranks, the CPU-rank set-up, collectives every rank reaches together
    data/                    input files -> records -> the token datasets each training stage reads
    model/                   config derived from the tokenizer, loading, LoRA/QLoRA adapters
    train/                   starting a run, resuming it, the train-save-evaluate step and what watches it
    audit/                   the checks on processed data, tokenizer and model before a run pays for a step
    infer/                   generation, chat, reward scoring and the OpenAI-compatible server
    export/                  a trained model for other tools: GGUF (llama.cpp, Ollama), 4-bit GPTQ/AWQ (vLLM)

Imports point one way: errors <- distributed <- {data, model} <- {audit, train, infer, export}; arguments
uses data and train, cli uses distributed, the entry scripts use them all. The README's Layout
section has the same map.
"""
