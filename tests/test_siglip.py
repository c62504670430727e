"""CuMo on a SigLIP vision tower (paper, Table 5): the same MoE, bzloss, S2 and upcycling as on CLIP, without a CLS
token, loaded by remote code, trained in the three stages, and built by `cumo-init` from a SigLIP folder."""

import math
import os
import shutil
import sys

import pytest
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from conftest import DATA, IMAGE_SIZE, PATCH_SIZE, random_pixels, tiny_config, tiny_tokenizer
from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration, CuMoProcessor
from modeling_cumo.moe_cumo import CuMoSparseMLP
from modeling_cumo.processing_cumo import make_image_processor
from modeling_cumo.vision_cumo import CuMoSiglipVisionModel, s2_crops
from test_remote_code import assert_fresh_process_gives
from test_trainer import colour_dataset, snapshot
from test_transformers_versions import VENVS


GRID = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 patch tokens per image, and no CLS token
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def siglip_config(vision_experts=0, projector_experts=0, scales=(1, 3), **overrides) -> CuMoConfig:
    text_config = tiny_config().text_config.to_dict()
    return CuMoConfig(vision_config=dict(SIGLIP), text_config=text_config, image_token_id=384, scales=list(scales),
                      vision_num_experts=vision_experts, projector_num_experts=projector_experts, **overrides)


def siglip_model(seed=0, **kwargs) -> CuMoForConditionalGeneration:
    torch.manual_seed(seed)
    return CuMoForConditionalGeneration(siglip_config(**kwargs)).eval()


def siglip_processor() -> CuMoProcessor:
    image_processor = make_image_processor(IMAGE_SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3, crop=False)
    return CuMoProcessor(image_processor, tiny_tokenizer(), patch_size=PATCH_SIZE, num_additional_image_tokens=0)


def chat_inputs(processor, num_images=2):
    images = [Image.new("RGB", (20 + 7 * i, 24), (200, 30 + 60 * i, 60)) for i in range(num_images)]
    text = ["Describe " + " and ".join(["<image>"] * num_images) + " briefly."]
    return processor(images=images, text=text, return_tensors="pt")


def test_config_takes_a_siglip_vision_config_object_or_dict_and_refuses_other_encoders():
    text_config = tiny_config().text_config.to_dict()
    for vision_config in (SiglipVisionConfig(**{k: v for k, v in SIGLIP.items() if k != "model_type"}), dict(SIGLIP)):
        config = CuMoConfig(vision_config=vision_config, text_config=text_config)
        assert type(config.vision_config) is SiglipVisionConfig and config.vision_config.hidden_size == 24
    reloaded = CuMoConfig.from_dict(siglip_config().to_dict())
    assert type(reloaded.vision_config) is SiglipVisionConfig
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        CuMoConfig(vision_config={"model_type": "vit", "hidden_size": 24}, text_config=text_config)


def test_dense_tower_is_transformers_siglip_without_head_and_reads_layer_minus_2_without_dropping_a_token():
    model = siglip_model()
    tower = model.model.vision_tower
    assert isinstance(tower, CuMoSiglipVisionModel) and isinstance(tower, SiglipVisionModel)
    assert not hasattr(tower, "head") and not hasattr(tower, "post_layernorm") and tower.num_prefix_tokens == 0
    assert "SiglipEncoderLayer" in model._no_split_modules  # device maps and FSDP keep SigLIP's layers whole
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in SIGLIP.items() if k != "model_type"})).eval()
    missing, unexpected = tower.load_state_dict(siglip.state_dict(), strict=False)
    assert not missing and unexpected and all(key.startswith(("head.", "post_layernorm.")) for key in unexpected)
    pixels = random_pixels(2)
    with torch.no_grad():
        features = model.get_image_features(pixels).last_hidden_state
        expected = siglip(pixels, output_hidden_states=True).hidden_states[-2]  # the input of the last layer
    assert expected.shape == (2, GRID, 24)
    assert features.shape == (2, GRID, 24 * 2)
    assert (features[..., :24] - expected).abs().max() <= 1e-6


def test_upcycling_preserves_logits_at_initialisation():
    model = siglip_model()
    processor = siglip_processor()
    inputs = chat_inputs(processor)
    with torch.no_grad():
        dense = model(**inputs).logits
    model.upcycle(num_experts=4, num_experts_per_tok=2)
    assert all(isinstance(layer.mlp, CuMoSparseMLP) for layer in model.model.vision_tower.encoder.layers)
    assert model.state_dict().keys() == siglip_model(vision_experts=4, projector_experts=4).state_dict().keys()
    with torch.no_grad():
        sparse = model(**inputs).logits
    assert (sparse - dense).abs().max() <= 1e-5
    assert model.model.vision_tower.encoder.layers[0].mlp.gate.weight.abs().sum() > 0


def test_bzloss_terms_appear_in_training_and_reach_every_router():
    model = siglip_model(vision_experts=4, projector_experts=4)
    inputs = chat_inputs(siglip_processor())
    with torch.no_grad():
        assert model(**inputs).vision_balance_loss is None  # inference: no MoE losses
    model.train()
    output = model(**inputs)
    for name in ("vision_balance_loss", "vision_router_z_loss", "projector_balance_loss", "projector_router_z_loss"):
        value = getattr(output, name)
        assert value is not None and math.isfinite(value.item()) and value.item() > 0, name
    # top-1 balance is at least 1 when perfectly balanced (E * sum P_e f_e with sum f_e = 1 and P_e ~ 1/E)
    assert output.vision_balance_loss.item() >= 0.9
    output.loss.backward()
    gates = [p for name, p in model.named_parameters() if name.endswith("gate.weight")]
    assert len(gates) == 3 + 1 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def test_s2_features_have_the_grid_shape_without_a_cls_token():
    model = siglip_model(vision_experts=4, projector_experts=4, scales=(1, 2, 3))
    pixels = random_pixels(3)
    with torch.no_grad():
        crops = model.model.vision_tower(s2_crops(pixels, [1, 2, 3]), num_layers=2)
        features = model.get_image_features(pixels)
    assert crops.last_hidden_state.shape == (3 * (1 + 4 + 9), GRID, 24)  # every token a patch: no CLS
    assert features.last_hidden_state.shape == (3, GRID, 24 * 3)
    assert features.pooler_output.shape == (3, GRID, 32)
    assert torch.equal(features.last_hidden_state[..., :24], crops.last_hidden_state[:3])
    # the processor expands each <image> to exactly the grid, so the model fills every placeholder
    processor = siglip_processor()
    inputs = chat_inputs(processor, num_images=2)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2 * GRID
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_feature_layer_and_experts_kernels_work_on_siglip():
    model = siglip_model(vision_experts=4, vision_feature_layer=-1)
    pixels = random_pixels(2)
    with torch.no_grad():
        full = model.model.vision_tower(pixels).last_hidden_state
        features = model.get_image_features(pixels).last_hidden_state
    assert torch.equal(features[..., :24], full)
    outputs = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model.get_image_features(pixels).pooler_output
    for implementation, out in outputs.items():
        assert (out - outputs["eager"]).abs().max() <= 1e-5, implementation


def test_generate_answers_as_greedy_forward_passes():
    model = siglip_model(vision_experts=4, projector_experts=4)
    processor = siglip_processor()
    inputs = chat_inputs(processor, num_images=1)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ids = inputs["input_ids"]
        for _ in range(4):  # without the KV cache: the whole prompt each step
            next_id = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("python", [sys.executable] + [os.path.join(venv, "bin", "python") for venv in VENVS],
                         ids=lambda python: "this" if python == sys.executable else python.split(os.sep)[-3])
def test_saved_folder_loads_with_remote_code_without_the_project(tmp_path, python):
    """Here, and in the environments of the oldest and newest supported transformers (`CUMO_TRANSFORMERS_VENVS`)."""
    model = siglip_model(vision_experts=4, projector_experts=4)
    processor = siglip_processor()
    folder = tmp_path / "cumo-siglip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_path = tmp_path / "photo.png"
    Image.new("RGB", (40, 25), (200, 30, 60)).save(image_path)
    inputs = processor(images=[Image.open(image_path)], text=["Describe <image> briefly."], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == GRID
    with torch.no_grad():
        expected = model(**inputs).logits

    assert_fresh_process_gives(expected, inputs, folder, image_path, tmp_path, python)


def siglip_trainer(tmp_path, stage, model, **overrides):
    from trainer import CuMoSFTConfig, CuMoSFTTrainer

    settings = dict(output_dir=str(tmp_path / stage), stage=stage, per_device_train_batch_size=4, max_steps=4,
                    learning_rate=2e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                    seed=0, data_seed=0, lr_scheduler_type="constant")
    settings.update(overrides)
    return CuMoSFTTrainer(model=model, args=CuMoSFTConfig(**settings), train_dataset=colour_dataset(),
                          processing_class=siglip_processor())


def next_stage(model, folder):
    """Each stage saves a normal folder that the next one loads, as `cumo-train` chains them."""
    model.save_pretrained(folder)
    return CuMoForConditionalGeneration.from_pretrained(folder)


def test_three_stages_train_a_siglip_cumo_and_the_vit_loss_falls(tmp_path):
    model = siglip_model(scales=(1, 2))
    before = snapshot(model)
    siglip_trainer(tmp_path, "pt", model, max_steps=2).train()
    changed = {name for name in before if not torch.equal(before[name], model.state_dict()[name])}
    assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)

    model = next_stage(model, tmp_path / "pt-model")
    before = snapshot(model)
    siglip_trainer(tmp_path, "pft", model, max_steps=2, learning_rate=1e-3).train()
    changed = {name.split(".")[1] for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= changed

    model = next_stage(model, tmp_path / "pft-model")
    trainer = siglip_trainer(tmp_path, "vit", model, max_steps=12)
    assert model.config.vision_is_moe and model.config.projector_is_moe
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("vision_balance_loss", "vision_router_z_loss", "projector_balance_loss", "projector_router_z_loss"):
        assert all(math.isfinite(entry[key]) for entry in logs), key
    losses = [entry["loss"] for entry in logs]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    experts = model.model.vision_tower.encoder.layers[0].mlp.experts
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])


@pytest.mark.parametrize("full", [True, False], ids=["SiglipModel", "SiglipVisionModel"])
def test_cumo_init_builds_a_dense_cumo_from_siglip_and_an_llm(tmp_path, full):
    from transformers import (AutoModelForImageTextToText, AutoProcessor, MistralConfig, MistralForCausalLM,
                              SiglipConfig, SiglipModel)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from trainer.init_model import main

    torch.manual_seed(0)
    vision = {k: v for k, v in SIGLIP.items() if k != "model_type"}
    if full:  # as google/siglip-so400m-patch14-384 is
        siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)))
        siglip_layer = siglip.vision_model.encoder.layers[1]
    else:
        siglip = SiglipVisionModel(SiglipVisionConfig(**vision))
        siglip_layer = siglip.encoder.layers[1]
    siglip.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(tmp_path / "siglip")
    llm = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=384))
    llm.save_pretrained(tmp_path / "llm")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "original_ckpt" / name, tmp_path / "llm" / name)

    main(["--vision-tower", str(tmp_path / "siglip"), "--llm", str(tmp_path / "llm"), "--output",
          str(tmp_path / "cumo"), "--dtype", "float32", "--scales", "1", "2"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "cumo", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "cumo", trust_remote_code=True)
    assert model.config.vision_config.model_type == "siglip_vision_model" and not model.config.vision_is_moe
    assert torch.equal(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight, siglip_layer.mlp.fc1.weight)
    assert processor.num_additional_image_tokens == 0
    image_processor = processor.image_processor
    assert list(image_processor.image_mean) == [0.5] * 3 and list(image_processor.image_std) == [0.5] * 3
    # a square image: exactly SigLIP's own preprocessing; a wide one is padded with the mean colour first
    square = Image.new("RGB", (40, 40), (10, 120, 240))
    expected = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})(square, return_tensors="pt")
    assert torch.equal(image_processor(square, return_tensors="pt")["pixel_values"], expected["pixel_values"])
    wide = image_processor(Image.new("RGB", (40, 20), (10, 120, 240)), return_tensors="pt")["pixel_values"]
    assert wide.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and wide[0, :, 0, 0].abs().max() < 0.01  # 127/255 -> ~0
    inputs = processor(images=[square], text=["Look: <image>"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == GRID
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    if full:  # and `cumo-train` takes the folder: a pt step trains the projector from SigLIP features
        from trainer.train import main as train

        colour_dataset(4).save_to_disk(tmp_path / "data")
        train(["--model_name_or_path", str(tmp_path / "cumo"), "--data_path", str(tmp_path / "data"), "--output_dir",
               str(tmp_path / "pt"), "--stage", "pt", "--max_steps", "1", "--per_device_train_batch_size", "4",
               "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no"])
        trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "pt", trust_remote_code=True)
        assert not torch.equal(trained.model.multi_modal_projector.linear_1.weight,
                               model.model.multi_modal_projector.linear_1.weight)
        assert torch.equal(trained.model.vision_tower.encoder.layers[1].mlp.fc1.weight, siglip_layer.mlp.fc1.weight)


def test_push_dry_run_stages_a_siglip_cumo_that_the_space_answers_with(tmp_path):
    from hub_upload import push
    from space.app import ChatEngine

    model = siglip_model(vision_experts=4, projector_experts=4)
    model.save_pretrained(tmp_path / "cumo")
    siglip_processor().save_pretrained(tmp_path / "cumo")
    push.main([str(tmp_path / "cumo"), "--repo-id", "someone/cumo-siglip", "--space", "--dry-run", "--stage-dir",
               str(tmp_path / "stage")])
    staged = tmp_path / "stage" / "model"
    assert (staged / "model.safetensors").is_file() and (staged / "vision_cumo.py").is_file()
    assert (tmp_path / "stage" / "space" / "app.py").is_file()

    engine = ChatEngine(str(staged), max_new_tokens=4)
    assert type(engine.model.model.vision_tower).__name__ == "CuMoSiglipVisionModel"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(photo)
    calls, generate = [], engine.model.generate

    def recorded(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    engine.model.generate = recorded
    chunks = list(engine.stream({"text": "What colour is it?", "files": [str(photo)]}, [], 0.0, 0.9, 4))
    assert len(calls) == 1 and all(isinstance(chunk, str) for chunk in chunks)
    image_tokens = int((calls[0]["input_ids"] == engine.model.config.image_token_id).sum())
    assert image_tokens == GRID == calls[0]["mm_encoder_outputs"]["image"].pooler_output.shape[1]


def test_the_toy_pipeline_runs_on_a_siglip_stand_in(tmp_path):
    """The README's toy pipeline with `--encoder siglip`: init, the three stages, then a chat with the result."""
    from PIL import Image

    from modeling_cumo import CuMoForConditionalGeneration, CuMoProcessor
    from trainer import init_model, toy, train

    toy.main(["--output", str(tmp_path), "--samples", "16", "--encoder", "siglip"])
    init_model.main(["--vision-tower", str(tmp_path / "siglip"), "--llm", str(tmp_path / "llm"),
                     "--output", str(tmp_path / "init"), "--dtype", "float32", "--scales", "1", "2"])
    cpu = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--bf16", "false", "--use_cpu", "true",
           "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none"]
    previous = tmp_path / "init"
    for stage, data in (("pt", "captions"), ("pft", "captions"), ("vit", "instructions")):
        train.main(["--stage", stage, "--model_name_or_path", str(previous), "--data_path",
                    str(tmp_path / f"{data}.json"), "--image_folder", str(tmp_path), "--output_dir",
                    str(tmp_path / stage), *cpu])
        previous = tmp_path / stage
    model = CuMoForConditionalGeneration.from_pretrained(previous).eval()
    processor = CuMoProcessor.from_pretrained(previous)
    assert model.config.vision_config.model_type == "siglip_vision_model" and model.config.vision_is_moe
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    inputs = processor(images=[Image.new("RGB", (40, 30), "red")],
                       text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == (56 // 14) ** 2  # no CLS among the tokens
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
