"""Reading and checking image-text chat records (the layouts: dstrain/data/multimodal.py), through
records.read_records, so every input kind and `file:line` error works as in text SFT. Each image is
checked by its header only (PIL reads its size, no pixels): the size sets its token count for processors
whose count varies (Qwen2-VL); the pixels are decoded per batch by the collator."""

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from dstrain.data.chat_format import check_turn_order, conversation_from_record
from dstrain.data.records import DatasetInput, ReadStats, raise_if_nothing_read, read_records
from dstrain.errors import BadRecord

IMAGE_PART_KEYS = ("path", "image", "url")


def image_location(value, base_dir: Path | None, where: str, index: int) -> Path:
    """A local image file named by a record: a path (relative to the data file) or a file:// URL."""
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"{where}: image {index} must be a file path, got {type(value).__name__}")
    if value.startswith("file://"):
        value = unquote(urlparse(value).path)
    elif re.match(r"^[a-z][a-z0-9+.-]*://", value) or value.startswith("data:"):
        raise BadRecord(f"{where}: image {index} is '{value[:40]}': training data names local image files "
                        "(a path or file://); download them first")
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path.resolve()


def image_size(path: Path, where: str, index: int) -> tuple[int, int]:
    """(height, width) from the image's header (PIL reads no pixels here); BadRecord when it cannot be read."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - image data only

    if not path.is_file():
        raise BadRecord(f"{where}: image {index} not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise BadRecord(f"{where}: image {index} ({path}) cannot be read as an image: "
                        f"{str(error).splitlines()[0]}") from None
    return height, width


def _flatten_parts(turns: list[dict], image_token: str, where: str) -> tuple[list[dict], list]:
    """Content-part messages as text with the image token where each image was, and the images in order."""
    images, flat = [], []
    for i, turn in enumerate(turns):
        content = turn["content"]
        if isinstance(content, list):
            text = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text.append(part["text"])
                elif kind == "image":
                    source = next((part[key] for key in IMAGE_PART_KEYS if key in part), None)
                    if source is None:
                        raise BadRecord(f"{where}: message {i} part {j} is an image without "
                                        f"{', '.join(repr(key) for key in IMAGE_PART_KEYS)}")
                    if turn["role"] != "user":
                        raise BadRecord(f"{where}: message {i} ({turn['role']}) holds an image; images go in "
                                        "user turns (the model reads images, it does not write them)")
                    images.append(source)
                    text.append(image_token)
                else:
                    raise BadRecord(f"{where}: message {i} part {j} must be {{'type': 'text', 'text': ...}} or "
                                    "{'type': 'image', 'path': ...}")
            content = "".join(text)
        flat.append({"role": turn["role"], "content": content})
    return flat, images


def image_conversation(record: dict, where: str, base_dir: Path | None, image_token: str,
                       data_format: str = "auto", default_system: str | None = None) -> dict:
    """A checked record: {"messages" (text with image tokens), "images" (absolute paths), "image_sizes"}."""
    listed = record.get("images")
    if listed is not None and not isinstance(listed, list):
        raise BadRecord(f"{where}: 'images' must be a list of image paths, got {type(listed).__name__}")
    has_parts = isinstance(record.get("messages"), list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in record["messages"])
    if has_parts:
        if listed:
            raise BadRecord(f"{where}: give images either as content parts or as 'images' with {image_token} "
                            "placeholders, not both")
        turns = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                 for m in record["messages"]]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in record["messages"]):
            raise BadRecord(f"{where}: every message must be an object with 'role' and 'content'")
        messages, sources = _flatten_parts(turns, image_token, where)
        if default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": default_system}] + messages
        check_turn_order(messages, where)
        placed = sum(m["content"].count(image_token) for m in messages)
        if placed != len(sources):  # the token typed into a text part would be read as an image
            raise BadRecord(f"{where}: the text holds {placed - len(sources)} {image_token} beyond its image parts; "
                            f"{image_token} is the model's image token and cannot appear in text")
    else:
        messages = conversation_from_record(record, where, data_format, default_system)
        sources = listed or []
        counts = [m["content"].count(image_token) for m in messages]
        placed = sum(counts)
        if placed != len(sources):
            raise BadRecord(f"{where}: {placed} {image_token} placeholders in the messages but {len(sources)} images")
        if any(count and m["role"] != "user" for count, m in zip(counts, messages)):
            raise BadRecord(f"{where}: an {image_token} placeholder outside a user turn; images go in user turns")
    paths = [image_location(source, base_dir, where, i) for i, source in enumerate(sources)]
    sizes = [list(image_size(path, where, i)) for i, path in enumerate(paths)]
    return {"messages": messages, "images": [str(path) for path in paths], "image_sizes": sizes}


def read_image_conversations(files, image_token: str, data_format: str = "auto", default_system: str | None = None,
                             skip_bad_records: bool = False, stats: ReadStats | None = None):
    """Every checked record of `files` with its `source` (file:line); paths relative to each data file."""
    stats = stats if stats is not None else ReadStats()
    for item in files:
        base_dir = None if isinstance(item, DatasetInput) else Path(item).resolve().parent

        def convert(record, where, base_dir=base_dir):
            return image_conversation(record, where, base_dir, image_token, data_format, default_system) | {
                "source": where}

        yield from read_records([item], convert, skip_bad_records, stats, "conversations", require_some=False)
    raise_if_nothing_read(list(files), stats, "conversations")
