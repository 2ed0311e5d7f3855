"""dstrain: what the entry scripts stand on, in packages named after what flows through them.

    cli, arguments, errors   every command's arguments (pure dataclasses) and its one-line errors
    distributed              ranks, the CPU-rank set-up, collectives every rank reaches together
    data/                    input files -> records -> the token datasets each training stage reads
    model/                   config derived from the tokenizer, loading, LoRA/QLoRA adapters
    train/                   starting a run, resuming it, the train-save-evaluate step and what watches it
    audit/                   the checks on processed data, tokenizer and model before a run pays for a step
    infer/                   generation, chat, reward scoring and the OpenAI-compatible server

Imports point one way: errors <- distributed <- {data, model} <- {audit, train, infer}; arguments
uses data and train, cli uses distributed (and train's provenance record reads the command line as
cli parses it), the entry scripts use them all. The README's Layout
section has the same map.
"""
