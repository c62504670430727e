"""generate(): batched left-padded prompts with their own images, KV cache, streaming, vision only at prefill."""

from threading import Thread

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from conftest import tiny_model


PROMPTS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a circle in this picture at all?"}]}],
]
IMAGES = [Image.new("RGB", size, colour) for size, colour in [((30, 20), "red"), ((18, 40), "blue"), ((28, 28), "green")]]


def generate(model, processor, prompts, images, **kwargs):
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    return [row[inputs["input_ids"].shape[1]:].tolist() for row in output]


def test_batched_left_padded_greedy_equals_one_by_one(processor):
    model = tiny_model(vision_experts=4, projector_experts=4)
    processor.tokenizer.padding_side = "left"
    batched = generate(model, processor, PROMPTS, IMAGES)
    single = [generate(model, processor, [p], [img])[0] for p, img in zip(PROMPTS, IMAGES)]
    assert batched == single
    assert len(set(map(tuple, single))) > 1  # the images and prompts make a difference


def test_vision_tower_runs_only_on_the_prefill_step(processor):
    model = tiny_model(vision_experts=4)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    generate(model, processor, PROMPTS[:1], IMAGES[:1])
    assert calls == [1]


def test_streaming_yields_the_generated_text(processor):
    model = tiny_model(vision_experts=4, projector_experts=4)
    text = processor.apply_chat_template(PROMPTS[0], add_generation_prompt=True)
    inputs = processor(images=IMAGES[:1], text=[text], return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer))
    thread.start()
    chunks = list(streamer)
    thread.join()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(chunks) == expected and expected.strip()


def test_forward_signature_is_precomputed_and_true():
    """generate() inspects a remote-code model's forward at every decode step; the signature is stored on the
    function so that costs nothing, and it must still name exactly forward's own parameters."""
    import inspect

    from modeling_cumo.modeling_cumo import CuMoForConditionalGeneration

    forward = CuMoForConditionalGeneration.forward
    assert "__signature__" in vars(forward)
    code = forward.__code__
    own = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]) + ["kwargs"]
    assert list(inspect.signature(forward).parameters) == own
    assert list(inspect.signature(tiny_model().forward).parameters) == own[1:]  # bound: without self
