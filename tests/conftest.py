"""Tiny CuMo models, tokenizer and processor built inside the tests: nothing is downloaded."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once at import by huggingface_hub: set before anything imports it

from pathlib import Path

import pytest
import torch
from hub_upload.sentencepiece_tokenizer import original_tokenizer
from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration, CuMoProcessor
from modeling_cumo.processing_cumo import make_image_processor


DATA = Path(__file__).parent / "data"
IMAGE_SIZE, PATCH_SIZE = 28, 7  # a 4x4 patch grid: 16 image tokens per image


def tiny_tokenizer():
    """The 384-piece SentencePiece tokenizer of the reference checkpoint as the converter writes it (the original's
    ids), plus `<image>` as a special token."""
    return original_tokenizer(DATA / "original_ckpt")


def tiny_config(vision_experts=0, projector_experts=0, text="mistral", scales=(1, 3), **overrides):
    text_config = dict(
        model_type=text, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=384, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    if text == "mixtral":
        text_config.update(num_local_experts=4, num_experts_per_tok=2)
    vision_config = dict(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, hidden_act="quick_gelu",
    )
    return CuMoConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=384,  # outside the LM vocabulary, as in converted checkpoints
        scales=list(scales),
        vision_num_experts=vision_experts,
        projector_num_experts=projector_experts,
        **overrides,
    )


def tiny_model(seed=0, **config_kwargs) -> CuMoForConditionalGeneration:
    torch.manual_seed(seed)
    return CuMoForConditionalGeneration(tiny_config(**config_kwargs)).eval()


def tiny_processor() -> CuMoProcessor:
    return CuMoProcessor(make_image_processor(IMAGE_SIZE), tiny_tokenizer(), patch_size=PATCH_SIZE)


def random_pixels(num_images, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def slow_sentencepiece_ids(text, sentencepiece, specials):
    """What the original's slow legacy `LlamaTokenizer` gives for `text`, without its BOS: the text split at the
    special tokens (`specials`: token -> id), each piece encoded by SentencePiece on its own."""
    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += sentencepiece.encode(piece)
    return ids


@pytest.fixture
def processor():
    return tiny_processor()
