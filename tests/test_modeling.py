"""The model's invariants: upcycling preserves outputs, a dense CuMo is a LLaVA, experts kernels agree, shapes."""

import dataclasses
import shutil

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from conftest import IMAGE_SIZE, PATCH_SIZE, random_pixels, tiny_config, tiny_model
from modeling_cumo.moe_cumo import CuMoExperts, CuMoSparseMLP, moe_losses
from modeling_cumo.vision_cumo import s2_crops, s2_merge


NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2


def image_prompt(num_images_per_row, length=6, seed=0):
    """input_ids rows with `n` runs of image tokens each, and the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in num_images_per_row:
        row = [1]
        for _ in range(n):
            row += torch.randint(3, 300, (2,), generator=generator).tolist() + [384] * NUM_PATCHES
        row += torch.randint(3, 300, (length,), generator=generator).tolist()
        rows.append(row)
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):  # left padding
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def test_upcycle_preserves_logits_and_updates_config():
    model = tiny_model(vision_experts=0, projector_experts=0)
    dense_projector = model.model.multi_modal_projector
    input_ids, attention_mask = image_prompt([1, 2])
    pixel_values = random_pixels(3)
    with torch.no_grad():
        dense = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    assert model.upcycle(num_experts=4, num_experts_per_tok=2) is model
    assert all(isinstance(layer.mlp, CuMoSparseMLP) for layer in model.model.vision_tower.encoder.layers)
    # the dense projector module is replaced by the same MoE block class the vision MLPs use
    assert isinstance(model.model.multi_modal_projector, CuMoSparseMLP) and model.model.multi_modal_projector is not dense_projector
    assert (model.config.vision_num_experts, model.config.projector_num_experts) == (4, 4)
    assert model.config.vision_is_moe and model.config.projector_is_moe
    # the same weight names as a model built MoE from its config: an upcycled model saves and loads as such
    assert model.state_dict().keys() == tiny_model(vision_experts=4, projector_experts=4).state_dict().keys()
    with torch.no_grad():
        sparse = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    assert (sparse - dense)[attention_mask.bool()].abs().max() <= 1e-5
    # experts are copies but the routers are live: the blocks route tokens to different experts
    gate = model.model.multi_modal_projector.gate.weight
    assert gate.abs().sum() > 0
    with pytest.raises(ValueError, match="already MoE"):
        model.upcycle()


def test_upcycle_projector_only():
    model = tiny_model()
    model.upcycle(num_experts=3, num_experts_per_tok=1, vision=False)
    assert not model.config.vision_is_moe and model.config.projector_is_moe
    assert not any(isinstance(layer.mlp, CuMoSparseMLP) for layer in model.model.vision_tower.encoder.layers)
    assert isinstance(model.model.multi_modal_projector, CuMoSparseMLP)
    assert model.config.projector_num_experts_per_tok == 1 and model.config.vision_num_experts == 0


def test_dense_cumo_with_one_scale_equals_transformers_llava():
    cumo = tiny_model(scales=[1])
    config = cumo.config
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava_config.text_config.vocab_size = 385  # LLaVA embeds the image token itself
    llava = LlavaForConditionalGeneration(llava_config).eval()
    state = cumo.state_dict()
    state["model.language_model.embed_tokens.weight"] = torch.cat(
        [state["model.language_model.embed_tokens.weight"], torch.zeros(1, config.text_config.hidden_size)]
    )
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], torch.zeros(1, config.text_config.hidden_size)])
    missing, unexpected = llava.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"]

    input_ids, attention_mask = image_prompt([1, 1])
    pixel_values = random_pixels(2)
    with torch.no_grad():
        ours = cumo(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        theirs = llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    mask = attention_mask.bool()
    assert (ours[mask] - theirs[mask][:, :384]).abs().max() <= 1e-5


@pytest.mark.parametrize("training", [False, True])
def test_experts_implementations_agree(training):
    model = tiny_model(vision_experts=4, projector_experts=4).train(training)
    pixel_values = random_pixels(2)
    results = {}
    assert model.model.vision_tower.config._experts_implementation == "auto"  # the default
    for implementation in ("eager", "grouped_mm", "batched_mm", "auto"):
        model.set_experts_implementation(implementation)
        assert model.model.vision_tower.config._experts_implementation == implementation
        model.zero_grad()
        features = model.get_image_features(pixel_values, compute_router_losses=True)
        (features.pooler_output.square().mean() + features.vision_balance_loss).backward()
        grads = {name: p.grad.clone() for name, p in model.model.vision_tower.named_parameters() if p.grad is not None}
        results[implementation] = (features.pooler_output.detach(), grads)
    reference_out, reference_grads = results["eager"]
    assert any("experts" in name for name in reference_grads)
    for implementation, (out, grads) in results.items():
        assert (out - reference_out).abs().max() <= 1e-5, implementation
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            assert (grad - reference_grads[name]).abs().max() <= 1e-5, (implementation, name)


def test_auto_experts_kernel_is_chosen_per_device(monkeypatch):
    from modeling_cumo import moe_cumo

    model = tiny_model(vision_experts=4).eval()
    used, eager = [], moe_cumo.CuMoExperts.forward
    monkeypatch.setattr(moe_cumo, "grouped_mm_experts_forward", lambda *args: used.append("grouped_mm") or eager(*args))
    monkeypatch.setattr(moe_cumo.CuMoExperts, "forward", lambda *args: used.append("eager") or eager(*args))
    with torch.no_grad():
        model.get_image_features(random_pixels(1))
    model.get_image_features(random_pixels(1)).pooler_output.sum().backward()
    assert set(used) == {"eager"}  # on the CPU, with and without gradients
    assert moe_cumo.per_device_experts_kernel(torch.zeros(1, device="meta")) == "grouped_mm"  # not the CPU


def compiler_toolchain_works() -> bool:
    """torch.compile's CPU backend builds C++; a machine without a working toolchain cannot run the compile test."""
    if shutil.which("g++") is None:
        return False
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).eq(3).all())
    except Exception:  # noqa: BLE001 - any toolchain failure means "cannot compile here"
        return False


def test_compiled_vision_tower_gives_the_same_features():
    """`model.model.vision_tower.compile()` (benchmarks/model_speed.py --compile): the data-dependent expert routing
    compiles, and routing, experts and S2 merge give what eager gives, router losses included."""
    if not compiler_toolchain_works():
        pytest.skip("torch.compile's CPU backend needs a working C++ toolchain")
    model = tiny_model(vision_experts=4, projector_experts=4).eval()
    pixels = random_pixels(2)
    with torch.no_grad():
        eager = model.get_image_features(pixels, compute_router_losses=True)
        model.model.vision_tower.compile()
        compiled = model.get_image_features(pixels, compute_router_losses=True)
    torch.testing.assert_close(compiled.pooler_output, eager.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.vision_balance_loss, eager.vision_balance_loss, rtol=1e-5, atol=1e-6)


def test_eager_experts_match_a_per_token_reference():
    """Outputs and gradients; expert 4 gets no token, so its bank slots must get zero gradient, not garbage."""
    torch.manual_seed(0)
    experts = CuMoExperts(None, 5, 6, 10, 5, "gelu")
    for p in experts.parameters():
        p.data.normal_()
    hidden = torch.randn(9, 6, requires_grad=True)
    top_k_index = torch.tensor([[0, 1], [1, 3], [3, 2], [2, 0], [0, 3], [1, 2], [3, 1], [2, 3], [0, 2]])
    top_k_weights = torch.rand(9, 2, requires_grad=True)
    out = experts(hidden, top_k_index, top_k_weights)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden, top_k_weights, *experts.parameters()], upstream)
    expected = torch.zeros(9, 5)
    for t in range(9):
        for j in range(2):
            e = top_k_index[t, j]
            h = torch.nn.functional.gelu(hidden[t] @ experts.up_proj[e].T + experts.up_proj_bias[e])
            expected[t] += top_k_weights[t, j] * (h @ experts.down_proj[e].T + experts.down_proj_bias[e])
    expected_grads = torch.autograd.grad(expected, [hidden, top_k_weights, *experts.parameters()], upstream)
    assert (out - expected).abs().max() <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert (grad - expected_grad).abs().max() <= 1e-4
    assert all(grad[4].abs().max() == 0 for grad in grads[2:])  # the unused expert
    assert all(grad[0].abs().max() > 0 for grad in grads[2:])


def test_s2_merge_inverts_s2_crops_on_a_patch_grid():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = s2_crops(images, [1, 2])
    assert crops.shape == (2 + 4 * 2, 3, 8, 8)
    # crop-major order: crop (row 0, col 1) of image 1 sits at index 2 + (0 * 2 + 1) * 2 + 1
    big = torch.nn.functional.interpolate(images, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(crops[2 + 3], big[1, :, 0:8, 8:16])
    # treat every pixel as a "patch": merging must stitch and area-pool back to the images' own grid
    patches = crops.flatten(2).transpose(1, 2)  # (crops, 64, 3)
    merged = s2_merge(patches, [1, 2], num_images=2)
    assert merged.shape == (2, 64, 6)
    assert torch.equal(merged[..., :3], images.flatten(2).transpose(1, 2))
    pooled = torch.nn.functional.avg_pool2d(big, 2).flatten(2).transpose(1, 2)
    assert (merged[..., 3:] - pooled).abs().max() <= 1e-4


def test_vision_tower_skips_the_last_layer_at_inference_and_its_experts_always():
    model = tiny_model(vision_experts=4)
    tower = model.model.vision_tower
    experts_calls, router_calls = [], []
    tower.encoder.layers[-1].mlp.experts.register_forward_hook(lambda *args: experts_calls.append(1))
    tower.encoder.layers[-1].mlp.gate.register_forward_hook(lambda *args: router_calls.append(1))
    pixels = random_pixels(2)
    with torch.no_grad():
        inference = model.get_image_features(pixels)
        assert router_calls == []
        training = model.get_image_features(pixels, compute_router_losses=True)
        assert router_calls == [1] and experts_calls == []  # routed for bzloss, experts' output never computed
        full = tower(s2_crops(pixels, model.config.scales), output_router_logits=True)  # every layer, fully
    assert experts_calls == [1]
    assert torch.equal(inference.pooler_output, training.pooler_output)
    balance, z = moe_losses(full.router_logits, [scale * scale * 2 for scale in model.config.scales])
    assert training.vision_balance_loss.item() == pytest.approx(balance.item(), rel=1e-6)
    assert training.vision_router_z_loss.item() == pytest.approx(z.item(), rel=1e-6)


def test_image_features_shapes_and_wrong_image_count_error():
    model = tiny_model(vision_experts=4, projector_experts=4)
    features = model.get_image_features(random_pixels(3))
    assert features.pooler_output.shape == (3, NUM_PATCHES, 32)
    assert features.last_hidden_state.shape == (3, NUM_PATCHES, 24 * 2)
    input_ids, attention_mask = image_prompt([1, 2])
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(2))
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=input_ids, pixel_values=torch.randn(3, 3, 32, 32))


def test_precomputed_image_features_give_the_same_logits():
    model = tiny_model(vision_experts=4, projector_experts=4)
    input_ids, attention_mask = image_prompt([1])
    pixel_values = random_pixels(1)
    with torch.no_grad():
        direct = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        cached = model.get_image_features(pixel_values)
        reused = model(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs={"image": cached}).logits
    assert torch.equal(direct, reused)


def test_config_rejects_bad_moe_settings():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config(vision_experts=2, vision_num_experts_per_tok=3)
    with pytest.raises(ValueError, match="scales"):
        tiny_config(scales=[1, 0])


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_other_causal_lms_work_through_text_config(text):
    model = tiny_model(vision_experts=4, projector_experts=4, text=text)
    assert type(model.model.language_model).__name__.lower().startswith(text)
    input_ids, attention_mask = image_prompt([1, 1])
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(2), labels=input_ids)
    assert torch.isfinite(out.loss) and out.text_balance_loss is None
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(2),
                               max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, input_ids.shape[1] + 3)


def test_outputs_behave_like_model_outputs():
    """CuMo's outputs cache their field names (a decode-speed fix) and must still act as transformers' ModelOutput:
    only set fields are keys, in order, indexable by name and position, and later assignments register."""
    from modeling_cumo.modeling_cumo import CuMoCausalLMOutputWithPast

    logits, aux = torch.ones(2), torch.zeros(1)
    output = CuMoCausalLMOutputWithPast(logits=logits, aux_loss=aux)
    assert list(output.keys()) == ["logits", "aux_loss"]
    assert output[0] is logits and output["aux_loss"] is aux and output.to_tuple() == (logits, aux)
    assert output.loss is None and output.vision_balance_loss is None
    output.loss = torch.tensor(3.0)
    assert list(output.keys()) == ["logits", "aux_loss", "loss"] and output["loss"] == 3.0
    output.hidden_states = None
    assert "hidden_states" not in output.keys()


def test_building_an_output_lists_its_fields_once(monkeypatch):
    """The decode-speed fix itself: transformers' ModelOutput lists the dataclass fields at every assignment
    (quadratic in our 13 fields); ours list them once, in __post_init__."""
    import transformers.utils.generic as generic

    from modeling_cumo.modeling_cumo import CuMoCausalLMOutputWithPast

    calls = []
    monkeypatch.setattr(generic, "fields", lambda obj: calls.append(1) or dataclasses.fields(obj))
    CuMoCausalLMOutputWithPast(logits=torch.ones(2), aux_loss=torch.zeros(1))
    assert len(calls) == 1


def test_random_upcycling_initialises_only_the_blocks_it_upcycles():
    model = tiny_model(vision_experts=4)  # vision already MoE, projector dense
    vision_experts = model.model.vision_tower.encoder.layers[0].mlp.experts.up_proj.detach().clone()
    model.upcycle(4, 2, experts_init="random")
    assert torch.equal(model.model.vision_tower.encoder.layers[0].mlp.experts.up_proj, vision_experts)
    projector = model.model.multi_modal_projector.experts.up_proj
    assert not torch.equal(projector[0], projector[1])  # fresh experts, not four copies of the dense layer
    with pytest.raises(ValueError, match="experts_init"):
        tiny_model().upcycle(4, 2, experts_init="zeros")


@pytest.mark.parametrize("vision_experts", [0, 4])
def test_the_model_lists_exactly_the_parameters_no_loss_reaches(vision_experts):
    """Dense: the layers past the feature layer never run; MoE: the last layer runs for its routers' losses, so only
    its experts get no gradient. Everything else does (a training step with labels, every loss on)."""
    model = tiny_model(vision_experts=vision_experts, projector_experts=vision_experts).train()
    input_ids, attention_mask = image_prompt([1, 2])
    model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(3), labels=input_ids).loss.backward()
    without = {id(p) for p in model.model.parameters_without_gradient()}
    assert without and without == {id(p) for p in model.parameters() if p.grad is None}
    model.freeze_parameters_without_gradient()
    assert {id(p) for p in model.parameters() if not p.requires_grad} == without
