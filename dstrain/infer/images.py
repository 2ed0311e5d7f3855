"""Images at inference, for image-text models (LLaVA-style, AutoModelForImageTextToText): the images a
prompt refers to, its token ids with each image's tokens in place, and the pixel inputs of a batch.

A prompt's messages carry the model's image token (`<image>`) once per image, in order, as the training
records' placeholder layout does (dstrain/data/multimodal.py); the ids are rendered by the same chat
template and expanded by the same function as in training, so a prompt is the tokens the model was
trained on. Images come as local paths (relative to a file that names them), file:// URLs, or
`data:image/...;base64,` URLs (OpenAI's image_url content parts); nothing is downloaded.
"""

import base64
import binascii
import io
from pathlib import Path

from dstrain.data.chat_template import render
from dstrain.data.image_records import image_location
from dstrain.errors import BadRecord, UserError


def open_image(source, base_dir: Path | None = None, where: str = "image", index: int = 0):
    """A PIL image (RGB) from a path, a file:// URL or a base64 data URL; UserError naming it otherwise."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise UserError(f"{where}: image {index} is a data URL but not data:image/...;base64,")
        try:
            raw = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise UserError(f"{where}: image {index}: the data URL is not valid base64") from None
        label = f"image {index} (data URL)"
    else:
        try:
            raw = image_location(source, base_dir, where, index)
        except BadRecord as error:
            raise UserError(str(error)) from None
        if not raw.is_file():
            raise UserError(f"{where}: image {index} not found: {raw}")
        label = f"image {index} ({raw})"
    try:
        with Image.open(raw) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{where}: {label} cannot be read as an image: {str(error).splitlines()[0]}") from None


def image_token(loaded) -> str:
    """The placeholder a message writes where an image goes (LLaVA's `<image>`)."""
    return loaded.processor.image_token


def require_image_model(loaded, where: str) -> None:
    if getattr(loaded, "processor", None) is None:
        raise UserError(f"{where}: images need an image-text model (a folder with a processor, such as sft.py "
                        "writes for a LLaVA-style model); this one reads text only")


def check_placeholders(loaded, messages: list[dict], images: list, where: str) -> None:
    token = image_token(loaded)
    placed = sum(message["content"].count(token) for message in messages)
    if placed != len(images):
        raise UserError(f"{where}: {placed} {token} placeholders in the messages but {len(images)} images")


def image_prompt_ids(loaded, messages: list[dict], images: list) -> list[int]:
    """The prompt's ids through the chat template (with the assistant's cue), each image token expanded
    into the tokens the processor gives that image."""
    # training's expansion; imported here, as the datasets library it pulls in is needed for images only
    from dstrain.data.multimodal import expand_image_tokens, image_token_counts  # noqa: PLC0415

    ids = render(loaded.tokenizer, messages, add_generation_prompt=True)
    counts = image_token_counts(loaded.processor, [(image.height, image.width) for image in images])
    return expand_image_tokens(ids, [0] * len(ids), loaded.processor.image_token_id, counts)[0]


def pixel_inputs(loaded, images_per_row: list[list] | None) -> dict:
    """The model inputs of a batch's images (pixel_values, and what else the image processor gives), in row
    order, which is the order the model places their features at the image tokens; {} when there are none."""
    images = [image for row in images_per_row or [] for image in row or []]
    if not images:
        return {}
    inputs = loaded.processor.image_processor(images, return_tensors="pt")
    dtype = loaded.model.dtype
    return {key: value.to(loaded.model.device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()}


def request_images(loaded, messages) -> tuple[list[dict], list]:
    """An OpenAI chat request's messages (openai_requests.ChatMessage) as template messages, each
    `image_url` part become the model's image token, and the images opened, in order. Text requests
    come back as they were, with no images."""
    rendered, images = [], []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, str):
            rendered.append({"role": message.role, "content": content})
            continue
        text = []
        for part in content:
            if part.type == "text":
                text.append(part.text)
                continue
            require_image_model(loaded, f"message {i}")
            if message.role != "user":
                raise UserError(f"message {i}: images go in user messages")
            images.append(open_image(part.image_url.url, where=f"message {i}", index=len(images)))
            text.append(image_token(loaded))
        rendered.append({"role": message.role, "content": "".join(text)})
    if images:
        check_placeholders(loaded, rendered, images, "messages")
    return rendered, images
