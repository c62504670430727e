"""Loading options: attention implementations, dtypes, experts implementation from `from_pretrained`."""

import pytest
import torch

from conftest import random_pixels, tiny_model
from test_modeling import image_prompt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cumo")
    model = tiny_model(vision_experts=4, projector_experts=4)
    model.save_pretrained(folder)
    input_ids, attention_mask = image_prompt([1, 2])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(3))
    with torch.no_grad():
        logits = model(**inputs).logits
    return folder, inputs, logits


def test_attention_implementations_agree(saved):
    from modeling_cumo import CuMoForConditionalGeneration

    folder, inputs, reference = saved
    for implementation in ("sdpa", "eager"):
        model = CuMoForConditionalGeneration.from_pretrained(folder, attn_implementation=implementation).eval()
        assert model.model.language_model.config._attn_implementation == implementation
        assert model.model.vision_tower.config._attn_implementation == implementation
        with torch.no_grad():
            logits = model(**inputs).logits
        mask = inputs["attention_mask"].bool()
        assert (logits - reference)[mask].abs().max() <= 1e-4, implementation


def test_half_precision_keeps_vision_and_projector_in_fp32(saved):
    from modeling_cumo import CuMoForConditionalGeneration

    folder, inputs, reference = saved
    model = CuMoForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    assert model.model.language_model.embed_tokens.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in model.model.vision_tower.parameters())
    assert all(p.dtype == torch.float32 for p in model.model.multi_modal_projector.parameters())
    with torch.no_grad():
        logits = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert logits.dtype == torch.float16 and (logits.float() - reference)[mask].abs().max() < 0.05


def test_experts_implementation_from_pretrained(saved):
    from modeling_cumo import CuMoForConditionalGeneration

    folder, inputs, reference = saved
    model = CuMoForConditionalGeneration.from_pretrained(folder, experts_implementation="eager").eval()
    assert model.model.vision_tower.config._experts_implementation == "eager"
    with torch.no_grad():
        assert (model(**inputs).logits - reference)[inputs["attention_mask"].bool()].abs().max() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids, attention_mask = image_prompt([1])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(1), labels=input_ids)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(vision_experts=4, projector_experts=4, text="mixtral").train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.vision_tower.encoder.layers[0].gradient_checkpointing
            assert model.model.language_model.layers[0].gradient_checkpointing
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-5, name
