"""GRPO (online RL on checkable rewards): the trainer, TRL's GRPOTrainer.

Why TRL: its GRPOTrainer does the sampling (transformers' generate, or vLLM colocated or as a server),
the group-relative advantages, the loss variants (grpo, dapo, dr_grpo, bnpo, cispo, ...), the KL to a
reference copy, and the metrics (rewards/<name>/mean and std, reward, kl, completions/mean_length,
completions/clipped_ratio, a table of completions with their rewards), maintained against transformers,
PEFT and DeepSpeed; it runs on our CPU ranks under ZeRO-2 and ZeRO-3. What this project adds around it:
prompt records checked and fitted (dstrain/data/prompts.py) and rewards whose failures stop every rank
with one line (dstrain/train/rewards.py).
"""

from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from dstrain.model.adapters import lora_config, report_trainable
from dstrain.train.rewards import Rewards


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's prompt sampler with each epoch's order drawn from (seed, epoch). TRL's draws each epoch's order from
    one generator seeded once, and a run resumed in a later epoch skips the earlier epochs without drawing their
    orders, so it trained on other prompts than the uninterrupted run did from the checkpoint on (checked here:
    identical losses through the checkpoint, different after). HF's Trainer calls set_epoch before each epoch."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


class CheckedRewardsGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that, after each batch's rewards are computed and gathered on every rank, stops all ranks
    together when a reward function failed on any of them; and whose prompt order resumes exactly."""

    checked_rewards: Rewards

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        sampler.__class__ = EpochSeededRepeatSampler
        return sampler

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.checked_rewards.raise_if_failed()
        return rewards

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            # Sampling from the model in this process afterwards (a notebook, a test) needs eval mode: with
            # activation checkpointing on, train-mode generation gives garbage.
            self.model.eval()


def grpo_trainer(model, tokenizer, rewards: Rewards, data, args, lora_args) -> GRPOTrainer:
    """With LoRA (and --beta above 0) the reference is the base model with the adapter off (no second copy)."""
    peft = lora_config(model, lora_args) if lora_args.use_lora else None
    trainer = CheckedRewardsGRPOTrainer(
        model=model, reward_funcs=rewards.funcs, args=args, processing_class=tokenizer,
        reward_processing_classes=rewards.processing_classes, peft_config=peft,
        train_dataset=data["train"], eval_dataset=data.get("validation"),
    )
    trainer.checked_rewards = rewards
    if peft:
        report_trainable(trainer.model, lora_args)
    return trainer
