"""The processor takes the empty modalities generic harnesses pass (lmms-eval's `huggingface` model sends `videos=[]`
and `audios=[]`), and refuses real video or audio with a clear message."""

import numpy as np
import pytest
import torch
from PIL import Image


def test_empty_videos_and_audio_give_the_same_inputs_as_images_and_text_alone(processor):
    image = Image.new("RGB", (30, 20), (200, 30, 60))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}],
        add_generation_prompt=True)
    expected = processor(images=[image], text=[prompt], padding=True, return_tensors="pt")
    for empties in ({"videos": [], "audios": []}, {"videos": [[]], "audio": None}, {"audio": [], "audios": None}):
        got = processor(text=[prompt], padding=True, return_tensors="pt", images=[image], **empties)
        assert got.keys() == expected.keys(), empties
        for key in expected:
            assert torch.equal(got[key], expected[key]), (empties, key)


def test_text_only_call_with_empty_modalities(processor):
    got = processor(text=["Hello there"], images=[], videos=[], audios=[], return_tensors="pt")
    assert torch.equal(got["input_ids"], processor(text=["Hello there"], return_tensors="pt")["input_ids"])


@pytest.mark.parametrize("name, value", [
    ("videos", [np.zeros((2, 8, 8, 3), dtype=np.uint8)]),
    ("audios", [np.zeros(1600, dtype=np.float32)]),
    ("audio", np.zeros(1600, dtype=np.float32)),
])
def test_real_video_or_audio_is_refused_with_a_clear_error(processor, name, value):
    with pytest.raises(ValueError, match=f"images and text only; got `{name}`"):
        processor(text=["<image>\nWhat is this?"], images=[Image.new("RGB", (8, 8))], **{name: value})
