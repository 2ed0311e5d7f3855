"""Image-text chat data (dstrain/data/multimodal.py), its audit (dstrain/audit/images.py) and prompts at
inference (dstrain/infer/images.py), on the session's tiny LLaVA-style model and generated images: no ranks.

The reference tokens are the processor's own: `processor(text, images)` expands each `<image>` after
decoding the image, and `processor.apply_chat_template(..., return_assistant_tokens_mask=True)` marks the
assistant tokens; the build reaches the same ids and labels without decoding an image.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from dstrain.arguments import ChatDataArguments, ModelArguments
from dstrain.audit import audit
from dstrain.audit.images import image_findings
from dstrain.data.chat_template import IGNORE
from dstrain.data.image_records import image_conversation
from dstrain.data.multimodal import ImageChatCollator, image_sft_datasets
from dstrain.data.sft import assistant_spans
from dstrain.errors import BadRecord, UserError
from dstrain.infer.images import image_prompt_ids, open_image
from dstrain.model.image_text import check_freeze_flags, freeze_parts, is_image_text, language_model_targets
from tests.helpers import assert_clean_error, run_main_in_process
from tests.tiny_multimodal import COLOURS, QUESTION, reply, write_image


@pytest.fixture(scope="module")
def processor(image_text_model):
    return AutoProcessor.from_pretrained(image_text_model)


def build(files, cache: Path, processor, **settings):
    args = ChatDataArguments(train_files=[str(f) for f in files], data_cache_dir=str(cache),
                             validation_split_percentage=0, **settings)
    return image_sft_datasets(args, processor.tokenizer, processor, seed=0)


@pytest.fixture(scope="module")
def built(image_chats, processor, tmp_path_factory):
    return build([image_chats], tmp_path_factory.mktemp("cache"), processor, max_length=128)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tokens_and_labels_are_the_processors_with_only_the_replies_trained(image_chats, built, processor):
    rows = built["train"]
    assert len(rows) == 13 and built.report["train"]["images"] == 12
    for record, row in zip(records(image_chats), rows):
        messages = record["messages"]
        paths = [image_chats.parent / p for p in record.get("images", [])] + [
            image_chats.parent / part["path"] for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image"]
        if isinstance(messages[0]["content"], list):  # content parts: the processor's template and mask
            parts = [{"role": m["role"], "content": [dict(p, path=str(image_chats.parent / p["path"]))
                                                     if p["type"] == "image" else p for p in m["content"]]
                      if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]}
                     for m in messages]
            expected = processor.apply_chat_template(parts, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True, return_tensors="pt")
            ids, mask = expected["input_ids"][0].tolist(), expected["assistant_masks"][0].tolist()
        else:  # placeholders: the processor on the rendered text and the decoded images
            text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
            images = [Image.open(p).convert("RGB") for p in paths] or None
            ids = processor(text=text, images=images)["input_ids"][0]
            ids = ids if isinstance(ids, list) else ids.tolist()
            mask = None
        assert list(row["input_ids"]) == ids
        assert row["images"] == [str(p.resolve()) for p in paths]
        trained = processor.tokenizer.decode([t for t in row["labels"] if t != IGNORE])
        assert trained == reply_of(messages) + "<|im_end|>"
        if mask is not None:
            assert list(row["labels"]) == [t if m else IGNORE for t, m in zip(ids, mask)]
        image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
        assert len(image_positions) == 5 * len(paths) and all(row["labels"][i] == IGNORE for i in image_positions)


def reply_of(messages):
    return messages[-1]["content"]


def test_both_layouts_make_the_same_row(tmp_path, processor):
    image = write_image(tmp_path / "a.png", COLOURS["red"])
    chat = [{"messages": [{"role": "user", "content": "<image>\n" + QUESTION},
                          {"role": "assistant", "content": reply("red")}], "images": ["a.png"]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                       {"type": "text", "text": "\n" + QUESTION}]},
                          {"role": "assistant", "content": reply("red")}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    rows = build([tmp_path / "d.jsonl"], tmp_path / "cache", processor)["train"]
    assert rows[0]["input_ids"] == rows[1]["input_ids"] and rows[0]["labels"] == rows[1]["labels"]
    assert rows[0]["images"] == rows[1]["images"] == [str(image.resolve())]


def test_a_cut_conversation_keeps_whole_images_and_leaves_out_the_rest(tmp_path, processor):
    write_image(tmp_path / "a.png", COLOURS["red"])
    write_image(tmp_path / "b.png", COLOURS["blue"])
    two = {"messages": [{"role": "user", "content": "<image>\n" + QUESTION}, {"role": "assistant", "content": "Red."},
                        {"role": "user", "content": "<image>\nAnd this one, a much longer question?"},
                        {"role": "assistant", "content": "That one is blue, I think."}], "images": ["a.png", "b.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(two) + "\n")
    whole = build([tmp_path / "d.jsonl"], tmp_path / "c1", processor, max_length=512)
    first_end = assistant_spans(whole["train"][0]["labels"])[0][1]
    cut = build([tmp_path / "d.jsonl"], tmp_path / "c2", processor, max_length=first_end + 3)
    row = cut["train"][0]
    assert cut.report["train"]["truncated"] == 1 and len(row["input_ids"]) == first_end
    assert row["images"] == [str((tmp_path / "a.png").resolve())] and row["image_tokens"] == [5]
    assert row["input_ids"].count(processor.image_token_id) == 5
    assert not audit("sft", cut, processor.tokenizer).findings


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [{"role": "user", "content": "<image> Hi"}, {"role": "assistant", "content": "A"}],
      "images": ["missing.png"]}, "image 0 not found"),
    ({"messages": [{"role": "user", "content": "<image> Hi"}, {"role": "assistant", "content": "A"}],
      "images": ["not_an_image.png"]}, "cannot be read as an image"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
      "images": ["ok.png"]}, "0 <image> placeholders in the messages but 1 images"),
    ({"messages": [{"role": "user", "content": "<image><image> Hi"}, {"role": "assistant", "content": "A"}],
      "images": ["ok.png"]}, "2 <image> placeholders in the messages but 1 images"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "image", "path": "ok.png"}, {"type": "text", "text": "A"}]}]}, "images go in user turns"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "A"}]},
     "an image without"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>"}]},
                   {"role": "assistant", "content": "A"}]}, "cannot appear in text"),
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A"}],
      "images": ["https://example.com/a.png"]}, "download them first"),
])
def test_bad_image_records_are_named(tmp_path, record, fragment):
    write_image(tmp_path / "ok.png", COLOURS["green"])
    (tmp_path / "not_an_image.png").write_text("plain text")
    with pytest.raises(BadRecord, match=fragment):
        image_conversation(record, "d.jsonl:3", tmp_path, "<image>")


def test_sft_names_the_file_and_line_of_a_missing_image(tmp_path, image_text_model, image_chats):
    lines = image_chats.read_text().splitlines()
    broken = json.loads(lines[3])  # the placeholder layout
    broken["images"] = ["images/nowhere.png"]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join([lines[0], json.dumps(broken)]) + "\n")
    (tmp_path / "images").mkdir()  # line 1's image; line 2's is missing
    (tmp_path / "images" / "red0.png").write_bytes((image_chats.parent / "images" / "red0.png").read_bytes())
    result = run_main_in_process("sft.py", "--model_name_or_path", image_text_model, "--train_files", data,
                                 "--output_dir", tmp_path / "out", "--data_cache_dir", tmp_path / "cache",
                                 "--report_to", "none", "--max_length", "128")
    assert_clean_error(result, f"{data}:2: image 0 not found", "nowhere.png")


def test_packing_and_freezing_a_text_model_are_refused_in_one_line(tmp_path, image_text_model, image_chats, base_model):
    packed = run_main_in_process("sft.py", "--model_name_or_path", image_text_model, "--train_files", image_chats,
                                 "--packing", "true", "--output_dir", tmp_path / "out", "--report_to", "none",
                                 "--max_length", "128")
    assert_clean_error(packed, "--packing true is not supported with image-text models")
    frozen = run_main_in_process("sft.py", "--model_name_or_path", base_model, "--train_files", image_chats,
                                 "--freeze_vision_tower", "true", "--output_dir", tmp_path / "out2",
                                 "--report_to", "none", "--max_length", "128")
    assert_clean_error(frozen, "--freeze_vision_tower and --freeze_projector apply to image-text models")


def test_collated_batch_gives_the_loss_of_the_processors_batch(built, processor, image_text_model, image_chats):
    model = AutoModelForImageTextToText.from_pretrained(image_text_model).eval()
    rows = [built["train"][i] for i in (0, 1, 12)]  # parts, placeholders, text only (shorter: padded)
    batch = ImageChatCollator(processor, processor.tokenizer.pad_token_id)(rows)
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert batch["attention_mask"][2].sum() == len(rows[2]["input_ids"]) < batch["input_ids"].shape[1]
    with torch.no_grad():
        ours = model(**batch).loss
        alone = []
        for row in rows:
            images = [Image.open(p).convert("RGB") for p in row["images"]]
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"] if images else None
            out = model(input_ids=torch.tensor([row["input_ids"]]), pixel_values=pixels,
                        labels=torch.tensor([row["labels"]]))
            predicted = sum(t != IGNORE for t in row["labels"][1:])  # the loss's tokens: labels shifted by one
            alone.append((out.loss * predicted, predicted))
    expected = sum(loss for loss, _ in alone) / sum(n for _, n in alone)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_audit_counts_images_and_names_rows_whose_image_tokens_disagree(built, processor):
    result = audit("sft", built, processor.tokenizer)
    assert not result.findings
    assert result.splits["train"]["images"] == 12 and result.splits["train"]["tokens_per_image_max"] == 5
    assert "images (train): 12, 60 image tokens, 5-5 tokens per image" in result.render()
    row = dict(built["train"][0])
    token = processor.image_token_id
    first_image = row["input_ids"].index(token)
    trained = dict(row, labels=[t if i != first_image else token for i, t in enumerate(row["labels"])])
    broken = Dataset.from_list([row, _drop_image_token(row, token), trained])
    findings, summary = image_findings("train", broken, {"image_token_id": token, "images": 3})
    assert [(f.count, f.records[0].split(" (")[0]) for f in findings] == [(1, row["source"]), (1, row["source"])]
    assert "4 image tokens for images of 5" in findings[0].records[0] and summary["images"] == 3


def _drop_image_token(row, token):
    at = row["input_ids"].index(token)
    return dict(row, input_ids=row["input_ids"][:at] + row["input_ids"][at + 1:],
                labels=row["labels"][:at] + row["labels"][at + 1:])


def test_model_parts_freeze_and_lora_targets_the_language_model_only(image_text_model, base_model):
    model = AutoModelForImageTextToText.from_pretrained(image_text_model)
    assert is_image_text(model.config)
    freeze_parts(model, freeze_vision_tower=True, freeze_projector=False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".vision_tower." in name for name in frozen)
    assert all(p.requires_grad for name, p in model.named_parameters() if "projector" in name)
    targets = language_model_targets(model, ["q_proj", "v_proj"])
    assert len(targets) == 4 and all(".language_model." in name for name in targets)
    assert any(name.endswith("q_proj") for name, _ in model.model.vision_tower.named_modules())  # same names there
    with pytest.raises(UserError, match="apply to image-text models"):
        check_freeze_flags(ModelArguments(model_name_or_path=str(base_model), freeze_projector=True),
                           AutoConfig.from_pretrained(base_model))


def test_inference_prompt_is_the_processors_and_data_urls_open(tmp_path, processor, image_text_model):
    import base64

    path = write_image(tmp_path / "a.png", COLOURS["blue"])
    loaded = type("Loaded", (), {"processor": processor, "tokenizer": processor.tokenizer})()
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    image = open_image(str(path))
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert image_prompt_ids(loaded, messages, [image]) == processor(text=text, images=[image])["input_ids"][0]
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert (np.asarray(open_image(url)) == np.asarray(image)).all()
    with pytest.raises(UserError, match="cannot be read as an image"):
        open_image("data:image/png;base64," + base64.b64encode(b"not a png").decode())


def test_audit_py_reports_images_with_the_training_flags(tmp_path, image_text_model, image_chats):
    result = run_main_in_process("audit.py", "--model_name_or_path", image_text_model, "--train_files", image_chats,
                                 "--stage", "sft", "--max_length", "64", "--data_cache_dir", tmp_path / "cache",
                                 "--validation_split_percentage", "0", "--freeze_vision_tower", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Data audit (sft): 0 problems" in result.stdout
    assert "images (train): 12, 60 image tokens, 5-5 tokens per image" in result.stdout
