"""Tiny models that have learned a few exact replies, for the inference tests: the session's random
`base_model` fine-tuned in-process (a plain PyTorch loop on the project's SFT token masks, a few
seconds), and LoRA adapters trained on top of it with PEFT. Greedy decoding then gives known answers,
so tests can check routing, history and stopping by the text itself."""

import json
import shutil
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from dstrain.data.chat_template import IGNORE, configure_chat_generation, tokenize_conversation

QUESTION = "What does str.upper() do?"
REPLIES = {  # what the chat model, and each adapter over it, learns to answer to QUESTION
    "base": "It returns the string in uppercase.",
    "pirate": "Arr, it shouts the string!",
    "terse": "Uppercase.",
}
NAME_TURNS = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."}]
NAME_QUESTION = "What is my name?"
NAME_REPLY_WITH_HISTORY, NAME_REPLY_WITHOUT = "Your name is Ada.", "I do not know."


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def base_conversations() -> list[list[dict]]:
    return [
        chat(("user", QUESTION), ("assistant", REPLIES["base"])),
        chat(("user", NAME_QUESTION), ("assistant", NAME_REPLY_WITHOUT)),
        NAME_TURNS + chat(("user", NAME_QUESTION), ("assistant", NAME_REPLY_WITH_HISTORY)),
        chat(("user", "Say hi."), ("assistant", "Hi!")),
    ]


def fit(model, tokenizer, conversations: list[list[dict]], steps: int, lr: float) -> None:
    """Full-batch AdamW on the assistant tokens only, until the replies are memorised."""
    rows = [tokenize_conversation(tokenizer, conversation) for conversation in conversations]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs 40x slower when its threads fight other processes
    try:
        for _ in range(steps):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return loss.item()


def without_chat_template(model_dir: Path, output_dir: Path) -> Path:
    """The same model and tokenizer with the chat template taken out, as a plain pretrained model from
    elsewhere would come."""
    shutil.copytree(model_dir, output_dir)
    (output_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((output_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(output_dir).chat_template
    return output_dir


_TRAINED: dict[Path, dict[str, Path]] = {}


def trained_models(base_model: Path, root: Path) -> dict[str, Path]:
    """chat (the fine-tuned model), pirate and terse (adapters over it), plain (chat without a template).
    Trained once per session and shared by the test modules (about 8 s on one core)."""
    if base_model not in _TRAINED:
        models = {name: root / name for name in ("chat", "pirate", "terse")}
        train_chat_model(base_model, models["chat"])
        for name in ("pirate", "terse"):
            train_adapter(models["chat"], models[name], REPLIES[name])
        models["plain"] = without_chat_template(models["chat"], root / "plain")
        _TRAINED[base_model] = models
    return _TRAINED[base_model]


def train_chat_model(base_model, output_dir, steps: int = 150) -> float:
    """The random base taught REPLIES["base"] and the name conversations; saved with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    loss = fit(model, tokenizer, base_conversations(), steps, lr=1e-2)
    configure_chat_generation(model, tokenizer)
    model.save_pretrained(output_dir, save_embedding_layers=False)  # the head's LoRA only, not its frozen copy
    tokenizer.save_pretrained(output_dir)
    return loss


# The output head too: a 64-wide model whose head and final norm stay frozen cannot make its logits
# sharp enough to overturn the memorised base reply (the loss stalls near 1.5 with all-linear alone).
ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def train_adapter(chat_model_dir, output_dir, reply: str, steps: int = 120, lr: float = 3e-3) -> float:
    """A LoRA adapter over the chat model that answers QUESTION with `reply`."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    with warnings.catch_warnings():  # PEFT's note on adapting a head tied to the embeddings (no merging here)
        warnings.simplefilter("ignore", UserWarning)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ADAPTED,
                                                 task_type="CAUSAL_LM"))
    loss = fit(model, tokenizer, [chat(("user", QUESTION), ("assistant", reply))], steps, lr)
    model.save_pretrained(output_dir, save_embedding_layers=False)  # the head's LoRA only, not its frozen copy
    tokenizer.save_pretrained(output_dir)
    return loss


# What the tiny reward model learns: the chat model's own reply to QUESTION beats the pirate adapter's,
# and a reply that answers beats one that does not.
REWARD_PAIRS = [
    (QUESTION, REPLIES["base"], REPLIES["pirate"]),
    (QUESTION, REPLIES["terse"], REPLIES["pirate"]),
    ("Say hi.", "Hi!", "Arr, it shouts the string!"),
    (NAME_QUESTION, NAME_REPLY_WITHOUT, "Arr, it shouts the string!"),
]


def train_reward_model(base_model, output_dir, steps: int = 60, lr: float = 3e-3) -> float:
    """A one-score head on the random base (AutoModelForSequenceClassification, as reward.py builds it)
    fitted with reward.py's loss, -log sigmoid(r_chosen - r_rejected), on REWARD_PAIRS rendered through the
    chat template as dstrain/infer/scoring.py renders replies; saved with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from dstrain.data.chat_template import render

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    sides = [[render(tokenizer, chat(("user", q), ("assistant", reply)), add_generation_prompt=False)
              for q, *replies in REWARD_PAIRS for reply in replies[i:i + 1]] for i in (0, 1)]
    batch = tokenizer.pad({"input_ids": sides[0] + sides[1]}, padding_side="right", return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            scores = model(**batch).logits[:, 0]
            chosen, rejected = scores[:len(REWARD_PAIRS)], scores[len(REWARD_PAIRS):]
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return loss.item()
