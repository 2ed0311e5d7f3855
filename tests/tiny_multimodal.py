"""A tiny LLaVA-style image-text model built from a config (no download) and generated images, for the
multimodal tests: a 2-layer CLIP vision tower on 28x28 images (4 patches + CLS), the projector, and a
2-layer Llama over the session tokenizer with `<image>` added. Its chat template is ChatML with image
content parts and `{% generation %}` markers, saved with a LlavaProcessor whose image processor is the
PIL one (the torchvision-based processors do not load here: torchvision's pip wheels are CUDA builds)."""

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from dstrain.data.multimodal import IMAGE_CHATML_TEMPLATE

IMAGE_SIZE, PATCH = 28, 14  # 2x2 patches + CLS = 5 vision features; LLaVA's "full" strategy keeps them all


def build_tiny_llava(tokenizer_dir: Path, output_dir: Path, seed: int = 0) -> Path:
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Added to the existing special tokens: replacing them would drop <|im_start|>/<|im_end|> (a trap).
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = IMAGE_CHATML_TEMPLATE
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="full",
        num_additional_image_tokens=1, chat_template=IMAGE_CHATML_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return Path(output_dir)


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 32), seed: int = 0) -> Path:
    """A small PNG: one colour with a little noise, so images differ but each is recognisable."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None, :] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return Path(path)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
QUESTION = "What colour is this?"


def reply(colour: str) -> str:
    return f"It is {colour}."


def write_image_chats(folder: Path, copies: int = 4) -> Path:
    """Conversations asking the colour of a generated image, in both layouts (content parts and `<image>`
    placeholders with "images"), image paths relative to the data file; plus one text-only conversation."""
    import json

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for copy in range(copies):
        for colour, rgb in COLOURS.items():
            image = write_image(folder / "images" / f"{colour}{copy}.png", rgb, seed=copy)
            relative = str(image.relative_to(folder))
            if copy % 2:
                lines.append({"messages": [{"role": "user", "content": f"<image>\n{QUESTION}"},
                                           {"role": "assistant", "content": reply(colour)}], "images": [relative]})
            else:
                lines.append({"messages": [
                    {"role": "user", "content": [{"type": "image", "path": relative},
                                                 {"type": "text", "text": f"\n{QUESTION}"}]},
                    {"role": "assistant", "content": reply(colour)}]})
    lines.append({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]})
    path = folder / "image_chats.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
