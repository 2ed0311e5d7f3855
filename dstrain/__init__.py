"""dstrain: what the entry scripts stand on, in packages named after what flows through them.

    cli, arguments, errors   every command's arguments (pure dataclasses) and its one-line errors
    distributed              ranks, the CPU-rank set-up, collectives every rank reaches together
    data/                    input files -> records -> the token datasets each training stage reads
    model/                   config derived from the tokenizer, loading, LoRA/QLoRA adapters
    train/                   starting a run, resuming it, the train-save-evaluate step and what watches it
    audit/                   the checks on processed data, tokenizer and model before a run pays for a step
    infer/                   generation, chat, reward scoring and the OpenAI-compatible server
    eval/                    benchmarks through lm-evaluation-harness, chat evaluation, contamination checks
    export/                  a trained model for other tools: GGUF (llama.cpp, Ollama), 4-bit GPTQ/AWQ (vLLM)
    stages                   which data each training stage reads, for audit.py and data.py prepare

Imports point one way, with no cycle: errors <- distributed <- data, model <- infer <- eval <- audit,
train; export uses data and model; arguments uses data, train and eval (the contamination filter);
stages uses arguments, data and model; cli uses distributed (and train's provenance record reads the
command line as cli parses it); the entry scripts use them all. The README's Layout
section has the same map.
"""
