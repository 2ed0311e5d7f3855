"""GRPO: online reinforcement learning with checkable rewards. For each prompt the model writes
--num_generations replies, each is scored by the --reward_funcs, and the model is pushed towards the
replies that scored above their group's mean (TRL's GRPOTrainer).

One node, ZeRO-2, math answers checked for equivalence and a reasoning format:
    deepspeed grpo.py --deepspeed ds_configs/zero2.json --model_name_or_path out/sft \
        --train_files math_prompts.jsonl --reward_funcs math_answer format --reward_weights 1.0 0.2 \
        --num_generations 8 --max_completion_length 512 --temperature 1.0 --learning_rate 1e-6 --output_dir out/grpo
Loss variants: --loss_type grpo|dapo|dr_grpo (and TRL's others); KL to the start: --beta 0.04
Adapters only: --use_lora true. vLLM generation (GPU, vllm installed): --use_vllm true --vllm_mode colocate|server
Your own reward: --reward_funcs my_rewards.py:score (f(prompts, completions, **fields) -> one number each);
a reward model from reward.py: --reward_funcs out/rm
Every argument in one file: deepspeed grpo.py configs/grpo_demo.json

Data: {"prompt": string or messages, ...any fields the rewards read, e.g. "answer"} (dstrain/data/prompts.py).
Logged: rewards/<name>/mean and /std, reward, kl (with --beta), completions/mean_length, completions/clipped_ratio,
and sample completions with their rewards. The output is a plain HF causal LM (or a PEFT adapter) that stops at
the end of its turn.
"""

from transformers import set_seed

from dstrain.arguments import GRPOTrainingArguments, ModelArguments, PreferenceLoraArguments, PromptDataArguments
from dstrain.cli import cli_entry, parse_args
from dstrain.data.chat_template import configure_chat_generation, require_chat_template
from dstrain.data.prompts import prompt_datasets, prompt_length_limit
from dstrain.distributed import finish
from dstrain.errors import UserError
from dstrain.model.adapters import quantization_config
from dstrain.model.loading import build_model, load_tokenizer, model_config_for
from dstrain.train.grpo import grpo_trainer
from dstrain.train.resume import apply_resume_plan, plan_resume
from dstrain.train.rewards import Rewards
from dstrain.train.run import start_run
from dstrain.train.steps import evaluate_and_record, train_and_save

ARGUMENTS = (ModelArguments, PromptDataArguments, PreferenceLoraArguments, GRPOTrainingArguments)


def main(model_args, data_args, lora_args, training_args) -> None:
    # ===== 0. this process joins the run; where it continues from =====
    run = start_run(training_args, model_args, data_args, lora_args)
    set_seed(training_args.seed)
    if not model_args.model_name_or_path:
        raise UserError("GRPO starts from a trained (usually SFT) chat model: give --model_name_or_path")
    resume = plan_resume(training_args)
    apply_resume_plan(training_args, resume)

    # ===== 1. the rewards (imported, reward models loaded: a bad one stops the run now); the tokenizer =====
    rewards = Rewards(training_args.reward_funcs, training_args.max_completion_length, training_args.format_pattern,
                      data_args.answer_field, model_args.trust_remote_code)
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    require_chat_template(tokenizer, model_args.tokenizer_name)
    config = model_config_for(model_args, tokenizer)
    max_prompt_length = prompt_length_limit(data_args.max_prompt_length, training_args.max_completion_length,
                                            getattr(config, "max_position_embeddings", None))

    # ===== 2. prompts: checked, fitted to --max_prompt_length, with the fields the rewards read =====
    data = prompt_datasets(data_args, tokenizer, training_args.seed, max_prompt_length)
    rewards.check_fields(data["train"].column_names)

    # ===== 3. the policy; generation stops at the end of the assistant's turn =====
    model = build_model(model_args, config, quantization_config(lora_args.quantization_bit))
    configure_chat_generation(model, tokenizer)

    # ===== 4. train, save (model + tokenizer + stop tokens), evaluate: the rewards on held-out prompts =====
    trainer = grpo_trainer(model, tokenizer, rewards, data, training_args, lora_args)
    train_and_save(run, trainer, tokenizer, resume)
    if "validation" in data:
        evaluate_and_record(trainer)
    finish()


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
