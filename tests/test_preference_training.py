"""reward.py, dpo.py and `reward.py score`: real 2-rank DeepSpeed runs (CPU ranks here) on a small
learnable preference set, under ZeRO-2 and ZeRO-3, full weights and LoRA.

The set: a question about Python, a chosen reply made of approving words and a rejected one of
disapproving words (disjoint vocabularies), in the string, chat and HH-transcript forms. A tiny
random model can learn it in a few steps, which is what these runs must show; the held-out pairs
are never trained on.
"""

import hashlib
import json
import random
import subprocess
import sys

import pytest

from dstrain.infer.scoring import load_reward_model, rewards
from tests.helpers import (
    REPO,
    assert_same_losses,
    assert_succeeded,
    kill_and_resume,
    run_deepspeed,
    run_main_in_process,
)

STEPS = 16
APPROVING = "clear correct helpful precise accurate careful useful kind".split()
DISAPPROVING = "wrong rude broken false lazy vague useless messy".split()
TOPICS = "lists strings loops classes functions modules files numbers".split()


def synthetic_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def reply(words):
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))).capitalize() + "."

    records = []
    for i in range(count):
        question = f"Tell me about {rng.choice(TOPICS)} in Python."
        chosen, rejected = reply(APPROVING), reply(DISAPPROVING)
        form = i % 3
        if form == 0:
            records.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        elif form == 1:
            records.append({"prompt": [{"role": "user", "content": question}],
                            "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            records.append({"prompt": f"Human: Hi.\n\nAssistant: Hello.\n\nHuman: {question}\n\nAssistant:",
                            "chosen": chosen, "rejected": rejected})
    return records


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefs")
    files = {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl"}
    for (name, path), (count, seed) in zip(files.items(), [(200, 1), (40, 2)]):
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(count, seed)))
    return files


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def preference_flags(stage, base_model, files, output_dir, *extra) -> list:
    return [
        "--deepspeed", REPO / f"ds_configs/zero{stage}.json", "--model_name_or_path", base_model,
        "--train_files", files["train"], "--validation_files", files["heldout"], "--max_length", 64,
        "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 8, "--learning_rate", "1e-3",
        "--max_steps", STEPS, "--logging_steps", 1, "--save_steps", STEPS, "--report_to", "none", "--seed", 11,
        "--output_dir", output_dir, "--data_cache_dir", output_dir.parent.parent / "cache", *extra,
    ]


def preference_run(script, stage, base_model, files, output_dir, *extra):
    return run_deepspeed(script, *preference_flags(stage, base_model, files, output_dir, *extra))


def train(request, tmp_path_factory, base_model, preference_files, runs):
    script, stage, extra = runs[request.param]
    output_dir = tmp_path_factory.mktemp(request.param) / "full" / "out"
    base_weights = sha256(base_model / "model.safetensors")
    result = preference_run(script, stage, base_model, preference_files, output_dir, *extra)
    assert_succeeded(result)
    assert sha256(base_model / "model.safetensors") == base_weights  # the starting model is never written
    return request.param, output_dir, result


LORA = ["--use_lora", "true", "--lora_r", 8, "--lora_alpha", 16]
REWARD_RUNS = {"reward-zero2": ("reward.py", 2, []),
               "reward-zero3-lora": ("reward.py", 3, LORA + ["--gradient_checkpointing"])}
DPO_RUNS = {"dpo-zero3": ("dpo.py", 3, ["--beta", 0.1]),
            "dpo-zero2-lora": ("dpo.py", 2, ["--beta", 0.1] + LORA)}


@pytest.fixture(scope="module", params=sorted(REWARD_RUNS))
def reward_run(request, tmp_path_factory, base_model, preference_files):
    return train(request, tmp_path_factory, base_model, preference_files, REWARD_RUNS)


@pytest.fixture(scope="module", params=sorted(DPO_RUNS))
def dpo_run(request, tmp_path_factory, base_model, preference_files):
    return train(request, tmp_path_factory, base_model, preference_files, DPO_RUNS)


def check_training(run, accuracy: str, margin: str) -> None:
    """Held-out pairwise accuracy >= 0.9 with a positive mean margin, falling loss, a DeepSpeed checkpoint."""
    name, output_dir, result = run
    assert "Pairs: 240 kept" in result.stdout and "Data: train 200 pairs" in result.stdout
    assert "Data audit (preference): 0 problems" in result.stdout
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert metrics[accuracy] >= 0.9, metrics
    assert metrics[margin] > 0, metrics
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == STEPS and sum(losses[-4:]) < sum(losses[:4]), losses
    assert (output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()
    if "lora" in name:
        assert "trainable of" in result.stdout
        assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.slow
def test_reward_model_reaches_high_held_out_pairwise_accuracy(reward_run):
    check_training(reward_run, "eval_accuracy", "eval_margin")


@pytest.mark.slow
def test_dpo_reaches_high_held_out_reward_accuracy(dpo_run):
    check_training(dpo_run, "eval_rewards/accuracies", "eval_rewards/margins")


RESUMED = {"reward-zero2", "dpo-zero3"}  # one chain per trainer: TRL's RewardTrainer and DPOTrainer


def check_resume(run, base_model, preference_files) -> None:
    """Rank 1 SIGKILLed after step 11; the same command resumes from checkpoint-8 and logs the uninterrupted
    run's losses."""
    name, full_dir, _ = run
    if name not in RESUMED:
        pytest.skip(f"resume is checked once per trainer, on {sorted(RESUMED)}")
    script, stage, extra = {**REWARD_RUNS, **DPO_RUNS}[name]
    chain_dir = full_dir.parent.parent / "chain" / "out"
    _, resumed = kill_and_resume(script, *preference_flags(stage, base_model, preference_files, chain_dir, *extra),
                                 "--save_steps", 8, kill_after=11)
    assert f"Resuming from {chain_dir / 'checkpoint-8'}\n" in resumed.stdout
    assert_same_losses(full_dir, chain_dir, STEPS)


@pytest.mark.slow
def test_a_reward_run_killed_mid_run_resumes_with_the_uninterrupted_losses(reward_run, base_model, preference_files):
    check_resume(reward_run, base_model, preference_files)


@pytest.mark.slow
def test_a_dpo_run_killed_mid_run_resumes_with_the_uninterrupted_losses(dpo_run, base_model, preference_files):
    """ZeRO-3, with the frozen reference copy."""
    check_resume(dpo_run, base_model, preference_files)


LOAD_REWARD_MODEL_WITHOUT_THIS_PROJECT = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
prompt = [{"role": "user", "content": "Tell me about loops in Python."}]
scores = []
for reply in ("Clear careful helpful.", "Rude broken vague."):
    ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], return_tensors="pt", return_dict=True)
    scores.append(model(**ids).logits[0, 0].item())
print(json.dumps(scores))
"""


def fresh_process(code: str, *args, cwd) -> str:
    """Run `code` in a new interpreter outside the repository (this project not importable)."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def plain_model_dir(name, output_dir, tmp_path):
    """The plain HF model: the output itself, or for LoRA the adapter merged by export.py."""
    if "lora" not in name:
        return output_dir
    merged = tmp_path / "merged"
    assert_succeeded(run_main_in_process("export.py", "--adapter", output_dir, "--output_dir", merged))
    return merged


@pytest.mark.slow
def test_saved_reward_model_loads_without_this_project_and_scores_like_the_score_command(reward_run, preference_files,
                                                                                        tmp_path):
    name, output_dir, _ = reward_run
    plain = plain_model_dir(name, output_dir, tmp_path)
    chosen, rejected = json.loads(fresh_process(LOAD_REWARD_MODEL_WITHOUT_THIS_PROJECT, plain, cwd=tmp_path))
    assert chosen > rejected

    # reward.py score, on the trained folder itself (adapter or full model): singles and held-out pairs
    singles = tmp_path / "answers.jsonl"
    singles.write_text(json.dumps({"prompt": "Tell me about loops in Python.", "response": "Clear careful helpful."})
                       + "\n" + json.dumps({"prompt": "Tell me about loops in Python.", "response": "Rude broken vague."})
                       + "\n")
    scored = tmp_path / "scored.jsonl"
    assert_succeeded(run_main_in_process("reward.py", "score", "--model", output_dir, "--input", singles,
                                         "--output", scored))
    rewards = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    assert rewards == pytest.approx([chosen, rejected], abs=1e-4)

    result = run_main_in_process("reward.py", "score", "--model", output_dir, "--input", preference_files["heldout"],
                                 "--output", scored, "--batch_size", 5)
    assert_succeeded(result)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in scored.read_text().splitlines()]
    assert summary["pairs"] == len(records) == 40
    wins = sum(r["reward_chosen"] > r["reward_rejected"] for r in records)
    assert summary["accuracy"] == wins / 40 >= 0.9


@pytest.mark.slow
def test_score_is_read_at_the_last_real_token_whatever_the_padding(reward_run):
    _, output_dir, _ = reward_run
    model, tokenizer = load_reward_model(str(output_dir))
    prompts = [[{"role": "user", "content": "Tell me about loops in Python."}],
               [{"role": "user", "content": "Tell me about files in Python, with all the details you know."}]]
    replies = ["Clear.", "Careful precise accurate useful helpful kind correct clear careful."]
    alone = [rewards(model, tokenizer, [p], [r], batch_size=1)[0] for p, r in zip(prompts, replies)]
    batched = rewards(model, tokenizer, prompts, replies, batch_size=2)  # the first is right-padded
    assert batched == pytest.approx(alone, abs=1e-5)


DPO_POLICY_PREFERS_CHOSEN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about loops in Python."}],
                                 add_generation_prompt=True, return_dict=True)["input_ids"]
def logp(model, reply):
    ids = tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    x = torch.tensor([list(prompt) + ids])
    with torch.no_grad():
        logits = model(x).logits[0, len(prompt) - 1:-1]
    return logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum().item()
out = {}
for name, path in (("policy", sys.argv[1]), ("reference", sys.argv[2])):
    model = AutoModelForCausalLM.from_pretrained(path)
    out[name] = logp(model, "Clear careful helpful.") - logp(model, "Rude broken vague.")
policy = AutoModelForCausalLM.from_pretrained(sys.argv[1])
out["stops"] = policy.generation_config.eos_token_id
out["generated"] = len(policy.generate(torch.tensor([list(prompt)]), max_new_tokens=4, do_sample=False)[0]) > len(prompt)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_dpo_policy_prefers_the_chosen_kind_of_reply_more_than_its_reference(dpo_run, base_model, tmp_path):
    name, output_dir, _ = dpo_run
    policy = plain_model_dir(name, output_dir, tmp_path)
    out = json.loads(fresh_process(DPO_POLICY_PREFERS_CHOSEN, policy, base_model, cwd=tmp_path))
    assert out["policy"] > out["reference"] + 1.0, out  # the log-prob gap moved toward the chosen reply
    assert out["stops"] == [4, 2] and out["generated"]  # ends its turn at <|im_end|>, as SFT outputs do
