"""Training: starting a run, resume plans, the shared train-save-evaluate step, and what watches a
run (monitoring, numerical faults, loss-spike rollback, preemption signals, checkpoint completeness,
provenance records, elastic resume)."""
