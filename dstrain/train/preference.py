"""Reward models and DPO on preference pairs: the trainers (TRL's). Scoring with a trained reward model
is dstrain/infer/scoring.py.

Why TRL: its RewardTrainer (loss -log sigmoid(r_chosen - r_rejected - margin), accuracy and margin
metrics) and DPOTrainer (frozen reference, the sigmoid/IPO/... losses, reward accuracies and
margins) are maintained against transformers, PEFT and DeepSpeed; both run on our CPU ranks under
ZeRO-2 and ZeRO-3. What they lack, this project adds around them: the data checks and the
turn-boundary length rule (dstrain/data/pairs.py).
"""

from trl import DPOTrainer, RewardTrainer

from dstrain.data.pairs import as_reward_pairs
from dstrain.model.adapters import lora_config, report_trainable


def reward_config(config):
    """The starting model's config with a one-score head (AutoModelForSequenceClassification), which
    reads the score at the last token that is not the pad token (ours, <unk>, is never content)."""
    config.num_labels = 1
    return config


def reward_trainer(model, tokenizer, data, args, lora_args) -> RewardTrainer:
    peft = lora_config(model, lora_args, task_type="SEQ_CLS") if lora_args.use_lora else None
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=peft,
        train_dataset=as_reward_pairs(data["train"]),
        eval_dataset=as_reward_pairs(data["validation"]) if "validation" in data else None,
    )
    if peft:
        report_trainable(trainer.model, lora_args)
    return trainer


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer over pairs that dstrain/data/pairs.py has already rendered, checked and fitted
    (prompt_ids, chosen_ids, rejected_ids): TRL's own preparation would render them again and cut
    over-long pairs by its own rule (keeping the start), so it is skipped."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def dpo_trainer(model, ref_model, tokenizer, data, args, lora_args) -> DPOTrainer:
    """With LoRA the reference is the base model with the adapter switched off (no second copy)."""
    peft = lora_config(model, lora_args) if lora_args.use_lora else None
    trainer = PretokenizedDPOTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=peft,
        train_dataset=data["train"], eval_dataset=data.get("validation"),
    )
    if peft:
        report_trainable(trainer.model, lora_args)
    return trainer
