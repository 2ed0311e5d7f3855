"""What chat.py does: an interactive chat with history, one answer, or a file of questions answered in
batches. Everything generates through dstrain/infer/generation.py."""

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import TextStreamer

from dstrain.data.chat_template import has_chat_template
from dstrain.data.image_records import image_location
from dstrain.data.records import read_records
from dstrain.errors import BadRecord, UserError
from dstrain.infer.generation import (
    Completion,
    chat_prompt_ids,
    generate_batch,
    generate_one,
    stop_token_ids,
    text_prompt_ids,
)
from dstrain.infer.images import check_placeholders, image_prompt_ids, image_token, open_image, require_image_model
from dstrain.infer.model_loading import InferenceModel
from dstrain.infer.sampling import Sampling

ROLES = ("system", "user", "assistant")


# ===== prompts for both modes =====

def conversation(system: str | None, history: list[dict], user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": user}]


def prompt_ids(loaded: InferenceModel, messages: list[dict], images: list | None = None) -> list[int]:
    """Through the chat template, or, for a model without one, the last message as plain text to continue.
    With images (PIL, an image-text model): each image token expanded into that image's tokens."""
    if images:
        return image_prompt_ids(loaded, messages, images)
    if has_chat_template(loaded.tokenizer):
        return chat_prompt_ids(loaded.tokenizer, messages)
    return text_prompt_ids(loaded.tokenizer, messages[-1]["content"])


def with_placeholders(loaded: InferenceModel, text: str, images: list) -> str:
    return with_image_tokens(text, len(images), image_token(loaded)) if images else text


def with_image_tokens(text: str, count: int, token: str = "<image>") -> str:
    """A user message with an image token per image: the text's own, or `count` of them before it."""
    return text if not count or token in text else token * count + "\n" + text


def room_to_generate(loaded: InferenceModel, prompt_tokens: int, max_new_tokens: int) -> int:
    """max_new_tokens, shortened where the prompt leaves less of the context (0: the prompt fills it)."""
    if loaded.context is None:
        return max_new_tokens
    return max(0, min(max_new_tokens, loaded.context - prompt_tokens))


# ===== interactive =====

def interactive_chat(loaded: InferenceModel, sampling: Sampling, system: str | None, read=input,
                     images: list | None = None) -> None:
    """user/assistant turns on the terminal (or a script on stdin), replies streamed as they come.
    The oldest exchanges are dropped when the conversation outgrows the model's context. An image-text
    model takes `/image PATH`: the image goes with the next message (`images`: with the first)."""
    chat = has_chat_template(loaded.tokenizer)
    print("Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits." if chat else
          "This model has no chat template: each line is continued as plain text, without history.", flush=True)
    if loaded.processor is not None:
        print("/image PATH sends an image with your next message.", flush=True)
    history: list[dict] = []
    pending, seen = list(images or []), []  # images for the next message; those of the history, in order
    while True:
        try:
            line = read("user: " if chat else "text: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history, pending, seen = [], [], []
            print("(conversation reset)", flush=True)
            continue
        if command.startswith("/image "):
            try:
                require_image_model(loaded, "/image")
                pending.append(open_image(command[len("/image "):].strip(), where="/image"))
            except UserError as error:
                print(f"({error})", flush=True)
            continue
        if not command:
            continue
        line = with_placeholders(loaded, line, pending) if pending else line
        messages = conversation(system, history, line)
        prompt = prompt_ids(loaded, messages, seen + pending)
        wanted = sampling.max_new_tokens
        while chat and history and room_to_generate(loaded, len(prompt), wanted) < wanted:
            if seen:  # the images of the exchange that goes go with it
                seen = seen[sum(m["content"].count(image_token(loaded)) for m in history[:2]):]
            history = history[2:]  # the oldest user/assistant exchange
            messages = conversation(system, history, line)
            prompt = prompt_ids(loaded, messages, seen + pending)
        room = room_to_generate(loaded, len(prompt), sampling.max_new_tokens)
        if room == 0:
            print(f"(this message alone fills the model's {loaded.context}-token context; send a shorter one)")
            continue
        print("assistant: " if chat else line, end="", flush=True)
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        completion = generate_one(loaded, prompt, replace(sampling, max_new_tokens=room), chat, streamer,
                                  images=seen + pending)
        seen, pending = seen + pending, []
        if chat:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": completion.text}]


def answer_one(loaded: InferenceModel, sampling: Sampling, system: str | None, question: str,
               images: list | None = None) -> Completion:
    """One answer, streamed to stdout (about `images`, PIL, for an image-text model)."""
    messages = conversation(system, [], with_placeholders(loaded, question, images) if images else question)
    if images:
        check_placeholders(loaded, messages, images, "--question")
    prompt = prompt_ids(loaded, messages, images)
    room = room_to_generate(loaded, len(prompt), sampling.max_new_tokens)
    if room == 0:
        raise UserError(f"--question is {len(prompt)} tokens: no room left in the model's "
                        f"{loaded.context}-token context")
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_one(loaded, prompt, replace(sampling, max_new_tokens=room), has_chat_template(loaded.tokenizer),
                        streamer, images=images)


# ===== batch =====

@dataclass
class Question:
    where: str  # file:line or file: record N, for errors
    messages: list[dict]
    record: dict  # what the answer file repeats back (id, question or messages)
    fields: dict = field(default_factory=dict)  # the record as read (eval.py chat reads its reference answers)
    images: list = field(default_factory=list)  # image paths (image-text models), in placeholder order


def _question(record, where: str, system: str | None, base_dir: Path | None = None) -> Question:
    """A string, {"question": str, "system"?: str, "id"?: any}, or {"messages": [... ending with a user turn]};
    either object may add "images" (paths, relative to the questions file), placed by their `<image>`
    placeholders (a question without any gets them all before its text)."""
    if isinstance(record, str):
        record = {"question": record}
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a string or an object, got {type(record).__name__}")
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise BadRecord(f"{where}: 'images' must be a list of image paths")
    echo = ({"id": record["id"]} if "id" in record else {}) | ({"images": images} if images else {})
    images = [_image_path(image, base_dir, where, i) for i, image in enumerate(images)]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise BadRecord(f"{where}: message {i} needs a role of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                raise BadRecord(f"{where}: message {i} has empty or non-string content")
        if messages[-1]["role"] != "user":
            raise BadRecord(f"{where}: the last message must be the user's question")
        return Question(where, messages, echo | {"messages": messages}, record, images)
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"{where}: no 'question' string and no 'messages' list (keys: {keys})")
    own_system = record.get("system", system)
    if own_system is not None and not isinstance(own_system, str):
        raise BadRecord(f"{where}: 'system' must be a string")
    question_text = with_image_tokens(question, len(images))  # LLaVA's token; checked against the model's later
    return Question(where, conversation(own_system, [], question_text), echo | {"question": question}, record, images)


def _image_path(source: str, base_dir: Path | None, where: str, index: int) -> str:
    """A question's image, checked to exist now, so a bad file fails before anything is generated."""
    if source.startswith("data:"):
        return source
    path = image_location(source, base_dir, where, index)
    if not path.is_file():
        raise BadRecord(f"{where}: image {index} not found: {path}")
    return str(path)


def read_questions(path: Path, system: str | None) -> list[Question]:
    """A JSON list (file: record N in errors) or JSON Lines (file:line), told apart by the first character."""
    if not path.is_file():
        raise UserError(f"--questions: file not found: {path}")
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise UserError(f"{path}: invalid UTF-8 at byte {error.start}") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: malformed JSON ({error.msg}, column {error.colno})") from None
        questions = [_question(record, f"{path}: record {i}", system, path.resolve().parent)
                     for i, record in enumerate(records, start=1)]
    else:
        # A line is an object or a bare JSON string (a question too).
        questions = list(read_records([path], lambda record, where: _question(record, where, system,
                                                                              path.resolve().parent),
                                      kinds=(dict, str), require_some=False))
    if not questions:
        raise UserError(f"{path}: no questions in the file")
    return questions


def answer_questions(loaded: InferenceModel, questions: list[Question], sampling: Sampling,
                     batch_size: int) -> list[Completion]:
    """Batched generation with left padding; questions of similar length share a batch (less padding),
    answers come back in the file's order."""
    chat = has_chat_template(loaded.tokenizer)
    if any(question.images for question in questions):
        require_image_model(loaded, questions[next(i for i, q in enumerate(questions) if q.images)].where)
    for question in questions:
        if question.images:
            check_placeholders(loaded, question.messages, question.images, question.where)
    # Images are decoded for their sizes (token counts) here and again per batch, never all kept at once.
    prompts = [prompt_ids(loaded, question.messages, _open_all(question)) for question in questions]
    limits = [room_to_generate(loaded, len(prompt), sampling.max_new_tokens) for prompt in prompts]
    for question, prompt, limit in zip(questions, prompts, limits):
        if limit == 0:
            raise UserError(f"{question.where}: the question is {len(prompt)} tokens, which fills the model's "
                            f"{loaded.context}-token context")
    stop_ids = stop_token_ids(loaded.model, loaded.tokenizer, chat)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = generate_batch(loaded, [prompts[i] for i in rows], sampling, stop_ids,
                               max_new_tokens=[limits[i] for i in rows],
                               images=[_open_all(questions[i]) for i in rows])
        for i, completion in zip(rows, batch):
            answers[i] = completion
    return answers


def _open_all(question: Question) -> list:
    return [open_image(image, where=question.where, index=i) for i, image in enumerate(question.images)]


def write_answers(path: Path, questions: list[Question], answers: list[Completion], settings: dict,
                  seconds: float) -> dict:
    """The answers with the settings and timing, written whole or not at all (a temporary file renamed)."""
    generated = sum(answer.completion_tokens for answer in answers)
    report = {
        "settings": settings,
        "timing": {"seconds": round(seconds, 3), "questions": len(answers),
                   "questions_per_s": round(len(answers) / seconds, 3) if seconds else None,
                   "completion_tokens": generated,
                   "tokens_per_s": round(generated / seconds, 2) if seconds else None},
        "answers": [question.record | {"answer": answer.text, "finish_reason": answer.finish_reason,
                                       "prompt_tokens": answer.prompt_tokens,
                                       "completion_tokens": answer.completion_tokens}
                    for question, answer in zip(questions, answers)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return report


