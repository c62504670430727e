"""The processor: the original's chat format and pad-to-square preprocessing, and clear errors for bad input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DATA, IMAGE_SIZE, PATCH_SIZE
from modeling_cumo.processing_cumo import make_image_processor


SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red car."}]},
    {"role": "user", "content": [{"type": "text", "text": "What color is the sky?"}]},
]


def test_chat_template_renders_mistral_instruct_system_exactly(processor):
    """The original's prompt text, after the BOS its tokenizer adds (CuMo's template writes every special token)."""
    rendered = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert rendered == (
        f"<s><s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<image>\nWhat is in this picture? [/INST] A red car. </s>"
        "[INST] What color is the sky? [/INST]"
    )
    finished = processor.apply_chat_template(CONVERSATION[:2])
    assert finished.endswith("[/INST] A red car. </s>")


def test_chat_template_with_empty_system_message_is_mistral_instruct(processor):
    rendered = processor.apply_chat_template([{"role": "system", "content": ""}] + CONVERSATION)
    assert rendered == (
        "<s><s>[INST] <image>\nWhat is in this picture? [/INST] A red car. </s>[INST] What color is the sky? [/INST]"
    )


def test_tokenized_chat_expands_the_image_and_keeps_the_originals_two_bos(processor):
    conversation = [dict(CONVERSATION[0], content=[{"type": "image", "image": Image.new("RGB", (9, 5))},
                                                   CONVERSATION[0]["content"][1]])]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids[:3] == [1, 1, processor.tokenizer.convert_tokens_to_ids("▁[")]
    assert ids.count(processor.image_token_id) == (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert inputs["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_preprocessing_is_bit_exact_with_the_original():
    refs = load_file(DATA / "refs.safetensors")
    image_processor = make_image_processor(image_size=refs["pixel_values.all"].shape[-1])
    images = [Image.open(path) for path in sorted((DATA / "images").glob("img*.png"))]
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, refs["pixel_values.all"])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_non_rgb_images_are_converted(processor, mode):
    rgb = Image.new("RGB", (12, 20), (255, 255, 255))
    image = Image.fromarray(np.full((20, 12), 65535, dtype=np.uint16)) if mode == "I;16" else rgb.convert(mode)
    assert image.mode == mode
    out = processor(images=[image], text=["<image> hi"], return_tensors="pt")
    reference = processor(images=[Image.new("RGB", (12, 20), (255, 255, 255))], text=["<image> hi"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # white stays white whatever the mode (16-bit scaled to 8 bits, palette looked up, alpha dropped)
    assert (out["pixel_values"] - reference["pixel_values"]).abs().max() < 0.1


def test_wrong_number_of_images_is_a_value_error(processor):
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="number of images"):
        processor(images=[image, image], text=["only one <image> here"])
    with pytest.raises(ValueError, match="no images"):
        processor(text=["an <image> without its picture"])


def test_unreadable_and_empty_images_are_value_errors(processor, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="read"):
        processor(images=[Image.open(truncated)], text=["<image>"])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="read"):
        processor(images=[str(not_an_image)], text=["<image>"])
    with pytest.raises(ValueError, match="at least one pixel"):
        processor(images=[Image.new("RGB", (0, 5))], text=["<image>"])
    with pytest.raises(ValueError, match="empty"):
        processor(images=[np.zeros((0, 4, 3), dtype=np.uint8)], text=["<image>"])


def test_sixteen_bit_images_are_scaled_not_clipped():
    from modeling_cumo.processing_cumo import to_rgb_image

    grey16 = Image.fromarray(np.full((4, 6), 128 * 257, dtype=np.uint16))
    assert grey16.mode == "I;16"
    converted = to_rgb_image(grey16)
    assert converted.mode == "RGB" and np.asarray(converted).max() == 128 and np.asarray(converted).min() == 128


def test_assistant_mask_marks_the_answers_as_transformers_does(processor, monkeypatch):
    from transformers.models.llava.processing_llava import LlavaProcessor

    from modeling_cumo import CuMoProcessor

    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the leaf?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it large?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    ]

    def masked(proc):
        out = proc.apply_chat_template([chat, chat[:2]], images=[[Image.new("RGB", (30, 20))]] * 2, tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
                                       padding=True)
        return out["input_ids"], out["assistant_masks"]

    ids, mask = masked(processor)
    assert processor.tokenizer.decode(ids[0][mask[0] == 1]).split() == ["Green.", "</s>", "No.", "</s>"]
    assert processor.tokenizer.decode(ids[1][mask[1] == 1]).split() == ["Green.", "</s>"]
    monkeypatch.setattr(CuMoProcessor, "_adjust_assistant_masks_indices", LlavaProcessor._adjust_assistant_masks_indices)
    assert torch.equal(masked(processor)[1], mask)
