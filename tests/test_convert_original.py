"""Converting an original CuMo checkpoint reproduces the original implementation's outputs (tests/data)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import DATA, tiny_model
from hub_upload.convert_original import ConversionError, convert


IMAGE_PLACEHOLDER = -200  # the original's IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def refs():
    return load_file(DATA / "refs.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = convert(DATA / "original_ckpt", tmp_path_factory.mktemp("converted") / "cumo")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    return folder, model


def splice(input_ids, attention_mask, labels, image_token_id, num_patches, width):
    """The original's -200 placeholders as our expanded image tokens, padding removed and redone on the right."""
    rows, row_labels, images = [], [], []
    consumed = 0
    for ids, mask, labs in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        row, row_label = [], []
        for token, real, label in zip(ids, mask, labs):
            if not real:
                continue
            row += [image_token_id] * num_patches if token == IMAGE_PLACEHOLDER else [token]
            row_label += [-100] * num_patches if token == IMAGE_PLACEHOLDER else [label]
        count = ids.count(IMAGE_PLACEHOLDER)
        images += list(range(consumed, consumed + count))
        consumed += max(count, 1)  # the original also consumes an image for a text-only prompt; we pass none
        rows.append(row)
        row_labels.append(row_label)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask, out_labels = torch.zeros_like(out), torch.full_like(out, -100)
    for i, (row, row_label) in enumerate(zip(rows, row_labels)):
        out[i, : len(row)], out_mask[i, : len(row)], out_labels[i, : len(row)] = (
            torch.tensor(row), 1, torch.tensor(row_label))
    return out, out_mask, out_labels, images


def reference_inputs(refs, case, model):
    input_ids = refs[f"{case}.input_ids"]
    attention_mask = refs.get(f"{case}.attention_mask", torch.ones_like(input_ids))
    labels = refs.get(f"{case}.labels", torch.full_like(input_ids, -100))
    num_patches = refs["vision.features"].shape[1]
    width = refs[f"{case}.logits"].shape[1] if f"{case}.logits" in refs else (
        input_ids.shape[1] + ((input_ids == IMAGE_PLACEHOLDER).sum(1).max().item()) * (num_patches - 1))
    ids, mask, labs, images = splice(input_ids, attention_mask, labels, model.config.image_token_id, num_patches, width)
    return ids, mask, labs, refs[f"{case}.images"][images]


def test_vision_features_and_projector_output_match(converted, refs):
    _, model = converted
    with torch.no_grad():
        features = model.get_image_features(refs["vision.pixel_values"])
    assert (features.last_hidden_state - refs["vision.features"]).abs().max() <= 1e-5
    assert (features.pooler_output - refs["projector.output"]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["batch", "multi"])
def test_logits_match_at_real_positions(converted, refs, case):
    _, model = converted
    input_ids, attention_mask, _, pixel_values = reference_inputs(refs, case, model)
    assert torch.equal(attention_mask, refs[f"{case}.spliced_attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    real = attention_mask.bool()
    assert (logits[real] - refs[f"{case}.logits"][real]).abs().max() <= 1e-4


def test_bzloss_components_match_in_training_mode(converted, refs):
    _, model = converted
    input_ids, attention_mask, _, pixel_values = reference_inputs(refs, "multi", model)
    assert len(pixel_values) == len(refs["multi.images"])  # every image is used by a prompt
    model.train()
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    finally:
        model.eval()
    expected = {
        "vision_balance_loss": "multi.clip_balance_loss", "vision_router_z_loss": "multi.clip_router_z_loss",
        "projector_balance_loss": "multi.mlp_balance_loss", "projector_router_z_loss": "multi.mlp_router_z_loss",
    }
    for ours, theirs in expected.items():
        assert getattr(out, ours).item() == pytest.approx(refs[theirs].item(), rel=1e-5, abs=1e-5), ours
    assert out.text_balance_loss is None


def test_cross_entropy_matches_on_the_training_batch(converted, refs):
    _, model = converted
    input_ids, attention_mask, labels, pixel_values = reference_inputs(refs, "train", model)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
    cross_entropy = out.loss - out.aux_loss
    assert cross_entropy.item() == pytest.approx(refs["train.lm_loss"].item(), rel=1e-5)


def test_greedy_generation_gives_identical_tokens(converted, refs):
    _, model = converted
    input_ids, attention_mask, _, pixel_values = reference_inputs(refs, "generate", model)
    new_tokens = refs["generate.output_ids"].shape[1] - 1  # the original returns [bos] + new tokens
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                max_new_tokens=new_tokens, do_sample=False)
    assert output[0, input_ids.shape[1]:].tolist() == refs["generate.output_ids"][0, 1:].tolist()


def test_converted_folder_is_complete_and_processor_preprocesses_like_the_original(converted, refs):
    folder, _ = converted
    config = json.loads((folder / "config.json").read_text())
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= config["auto_map"].keys()
    assert config["scales"] == [1, 3] and config["vision_num_experts"] == 4 and config["projector_num_experts"] == 4
    for name in ("modeling_cumo.py", "vision_cumo.py", "moe_cumo.py", "processing_cumo.py", "generation_config.json",
                 "chat_template.jinja", "tokenizer.json", "processor_config.json"):
        assert (folder / name).is_file(), name
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    from PIL import Image

    images = [Image.open(p) for p in sorted((DATA / "images").glob("img*.png"))]
    texts = ["Look at this <image> picture."] * len(images)
    assert torch.equal(processor(images=images, text=texts, return_tensors="pt")["pixel_values"], refs["pixel_values.all"])


def original_keys(model):
    """A CuMo-HF state dict written back in the original project's key layout (for synthetic originals)."""
    state, out = model.state_dict(), {}
    for key, tensor in state.items():
        if key.startswith("model.vision_tower."):
            rest = key.removeprefix("model.vision_tower.")
            if ".mlp.experts." in rest:
                layer, name = rest.split(".mlp.experts.")
                linear = "fc1" if name.startswith("up_proj") else "fc2"
                for e, t in enumerate(tensor):
                    out[f"model.vision_tower.vision_model.{layer}.experts.{e}.{linear}.{'bias' if name.endswith('bias') else 'weight'}"] = t.clone()
            else:
                out["model.vision_tower.vision_model." + rest.replace(".mlp.gate.", ".gate.")] = tensor
        elif key.startswith("model.multi_modal_projector.experts."):
            name = key.removeprefix("model.multi_modal_projector.experts.")
            for e, t in enumerate(tensor):
                out[f"model.mm_projector.experts.{e}.{0 if name.startswith('up_proj') else 2}.{'bias' if name.endswith('bias') else 'weight'}"] = t.clone()
        elif key.startswith("model.multi_modal_projector."):
            out[key.replace("model.multi_modal_projector.", "model.mm_projector.")] = tensor
        elif key.startswith("model.language_model."):
            out["model." + key.removeprefix("model.language_model.")] = tensor
        else:
            out[key] = tensor
    return out


def write_original(model, folder, shards=1):
    """A synthetic original checkpoint of `model` (Mixtral experts written per expert, as the original stores them)."""
    folder.mkdir(parents=True)
    config = model.config
    text = config.text_config.to_dict()
    original = {k: v for k, v in text.items() if k not in ("model_type", "rope_parameters", "dtype")}
    original.update(
        model_type=f"llava_{config.text_config.model_type}", rope_theta=config.text_config.rope_parameters["rope_theta"],
        mm_vision_tower="clip", mm_hidden_size=config.vision_config.hidden_size, scales=config.scales,
        mm_projector_type="smoe_mlp", num_experts=config.vision_num_experts, num_selected=config.vision_num_experts_per_tok,
        clip_smoe=True, mlp_smoe=True, training=True, local_rank=0, mm_vision_select_layer=-2, torch_dtype="float32",
    )
    (folder / "config.json").write_text(json.dumps(original))
    (folder.parent / "clip").mkdir()
    (folder.parent / "clip" / "config.json").write_text(json.dumps({
        "model_type": "clip", "text_config": {}, "vision_config": config.vision_config.to_dict()}))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "original_ckpt" / name, folder / name)
    state = original_keys(model)
    if config.text_config.model_type == "mixtral":
        for key in [k for k in state if ".mlp.experts." in k and k.startswith("model.layers.")]:
            fused = state.pop(key)
            layer = key.split(".mlp.")[0]
            for e, t in enumerate(fused):
                if key.endswith("gate_up_proj"):
                    w1, w3 = t.chunk(2, dim=0)
                    state[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = w1.clone()
                    state[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = w3.clone()
                else:
                    state[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = t.clone()
        for key in [k for k in state if k.endswith(".mlp.gate.weight") and k.startswith("model.layers.")]:
            state[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = state.pop(key)
    keys = sorted(state)  # interleave expert keys across shards, as large checkpoints do
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for number, part in enumerate(parts, start=1):
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("text", ["mixtral", "mistral"])
def test_multi_shard_synthetic_original_round_trips(tmp_path, text):
    # the original format has one expert count and one top-k for both the CLIP and the projector MoE
    model = tiny_model(vision_experts=3, projector_experts=3, text=text, scales=[1, 2],
                       vision_num_experts_per_tok=1, projector_num_experts_per_tok=1)
    write_original(model, tmp_path / "original" / "ckpt", shards=3)
    folder = convert(tmp_path / "original" / "ckpt", tmp_path / "converted", max_shard_size="40KB")
    shards = list(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size < 60_000 for p in shards)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    loaded = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert loaded.config.scales == [1, 2] and loaded.config.projector_num_experts_per_tok == 1
    ids = torch.tensor([[1, 5, 6] + [384] * 16 + [7, 8, 9]])
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels, labels=ids)
        actual = loaded(input_ids=ids, pixel_values=pixels, labels=ids)
    assert (expected.logits - actual.logits).abs().max() <= 1e-5
    if text == "mixtral":
        assert actual.text_balance_loss is not None
        assert actual.text_balance_loss.item() == pytest.approx(expected.text_balance_loss.item(), rel=1e-5)


def test_pickled_weights_need_allow_pickle(tmp_path):
    original = tmp_path / "ckpt"
    shutil.copytree(DATA / "original_ckpt", original)
    shutil.copytree(DATA / "vision_tower", tmp_path / "vision_tower")
    state = load_file(original / "model.safetensors")
    (original / "model.safetensors").unlink()
    torch.save(state, original / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="--allow-pickle"):
        convert(original, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    folder = convert(original, tmp_path / "converted", allow_pickle=True)
    assert (folder / "model.safetensors").is_file()


def test_bad_inputs_fail_clearly_and_leave_no_output(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path, tmp_path / "out1")
    broken = tmp_path / "broken"
    shutil.copytree(DATA / "original_ckpt", broken)
    shutil.copytree(DATA / "vision_tower", tmp_path / "vision_tower")
    state = load_file(broken / "model.safetensors")
    state.pop("model.mm_projector.experts.3.2.weight")
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ConversionError, match="only experts"):
        convert(broken, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ConversionError, match="model_type"):
        convert(broken, tmp_path / "out3")


def test_command_line_reports_errors_in_the_users_terms(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "hub_upload.convert_original", "--input", str(tmp_path),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "has no config.json" in run.stderr and "Traceback" not in run.stderr
    help_text = subprocess.run([sys.executable, "-m", "hub_upload.convert_original", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--allow-pickle" in help_text and "--vision-tower" in help_text


def test_original_training_files_load_into_a_cumo_folder(tmp_path):
    trained = tiny_model(seed=1, projector_experts=4, vision_experts=4)
    projector = {k.replace("model.multi_modal_projector.", "model.mm_projector."): v
                 for k, v in original_keys(trained).items() if k.startswith("model.mm_projector.")}
    clip = {k: v for k, v in original_keys(trained).items() if k.startswith("model.vision_tower.")}
    torch.save(projector, tmp_path / "mm_projector.bin")
    torch.save(clip, tmp_path / "clip.bin")
    tiny_model(seed=2, projector_experts=4, vision_experts=4).save_pretrained(tmp_path / "base")

    import subprocess
    import sys

    command = [sys.executable, "-m", "hub_upload.convert_original", "--input", str(tmp_path / "mm_projector.bin"),
               str(tmp_path / "clip.bin"), "--base", str(tmp_path / "base"), "--output", str(tmp_path / "out")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr
    run = subprocess.run(command + ["--allow-pickle"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ours, theirs = loaded.state_dict(), trained.state_dict()
    for key in theirs:
        if "vision_tower" in key or "multi_modal_projector" in key:
            assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(ours["lm_head.weight"], theirs["lm_head.weight"])  # the rest comes from the base

    dense = tiny_model(seed=3)
    from hub_upload.convert_original import apply_original_weights

    with pytest.raises(ConversionError, match="upcycle"):
        apply_original_weights(dense, [tmp_path / "mm_projector.bin"])
