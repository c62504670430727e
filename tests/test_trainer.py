"""CuMoSFTTrainer: the three stages change what they should, bzloss reaches the loss on TRL's paths, resume."""

import contextlib
import json
import math

import pytest
import torch
from datasets import Dataset
from PIL import Image

from conftest import tiny_model, tiny_processor
from trainer import CuMoDataCollator, CuMoSFTConfig, CuMoSFTTrainer, load_llava_json


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def colour_dataset(n=24):
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]},
            ],
            "images": [Image.new("RGB", (20 + i % 5, 24), COLOURS[name])],
        })
    return Dataset.from_list(rows)


def make_trainer(tmp_path, stage, model, dataset=None, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), stage=stage, per_device_train_batch_size=4, max_steps=4,
                    learning_rate=2e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                    seed=0, data_seed=0, lr_scheduler_type="constant")
    settings.update(overrides)
    return CuMoSFTTrainer(model=model, args=CuMoSFTConfig(**settings), train_dataset=dataset or colour_dataset(),
                          processing_class=tiny_processor())


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_pt_trains_only_the_projector(tmp_path):
    model = tiny_model()
    before = snapshot(model)
    make_trainer(tmp_path, "pt", model).train()
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)
    assert {n for n in before if n.startswith("model.multi_modal_projector.")} == changed


def test_pt_uses_the_plain_format_with_loss_on_the_caption_only(tmp_path):
    trainer = make_trainer(tmp_path, "pt", tiny_model())
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokenizer = trainer.processing_class.tokenizer
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<s><image>") and "[INST]" not in text
    assert tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100]).strip() == "It is red."


def test_pft_changes_vision_projector_and_language_model(tmp_path):
    model = tiny_model()
    before = snapshot(model)
    make_trainer(tmp_path, "pft", model).train()
    changed = {name.split(".")[1] for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= changed


def test_dense_stages_refuse_an_moe_model(tmp_path):
    with pytest.raises(ValueError, match="dense"):
        make_trainer(tmp_path, "pft", tiny_model(vision_experts=4))


def test_vit_upcycles_then_experts_diverge_with_bzloss(tmp_path):
    model = tiny_model()
    trainer = make_trainer(tmp_path, "vit", model, max_steps=12)
    experts = model.model.vision_tower.encoder.layers[0].mlp.experts
    assert torch.equal(experts.up_proj[0], experts.up_proj[1]) and torch.equal(experts.up_proj[1], experts.up_proj[3])
    routers = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("gate.weight")}
    assert len(routers) == 3 + 1
    trainer.train()
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])
    for name, p in model.named_parameters():
        if name in routers:
            assert not torch.equal(p, routers[name]), f"router {name} got no gradient"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("vision_balance_loss", "vision_router_z_loss", "projector_balance_loss", "projector_router_z_loss"):
        assert all(math.isfinite(entry[key]) for entry in logs), key
    losses = [entry["loss"] for entry in logs]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_vit_from_scratch_experts_differ_from_the_dense_mlp(tmp_path):
    model = tiny_model()
    dense_fc1 = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.detach().clone()
    make_trainer(tmp_path, "vit", model, upcycle_experts_init="random")
    experts = model.model.vision_tower.encoder.layers[0].mlp.experts
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])
    assert not any(torch.equal(experts.up_proj[e], dense_fc1) for e in range(4))
    assert not torch.equal(model.model.multi_modal_projector.experts.up_proj[0],
                           model.model.multi_modal_projector.experts.up_proj[1])


def test_a_checkpoint_path_is_trained_with_this_packages_classes(tmp_path):
    """The trainer loads a folder with the installed package's classes, never the folder's remote-code copy, and
    random expert init reaches them (it once silently kept the copies, so 'from scratch' trained like co-upcycling);
    a model loaded with remote code is refused with what to do instead."""
    from transformers import AutoModelForImageTextToText
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from modeling_cumo import CuMoForConditionalGeneration

    model = tiny_model()
    dense_fc1 = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.detach().clone()
    model.save_pretrained(tmp_path / "dense")
    tiny_processor().save_pretrained(tmp_path / "dense")
    trainer = make_trainer(tmp_path, "vit", str(tmp_path / "dense"), upcycle_experts_init="random")
    loaded = trainer.model
    assert type(loaded) is CuMoForConditionalGeneration
    experts = loaded.model.vision_tower.encoder.layers[0].mlp.experts
    assert not any(torch.equal(experts.up_proj[e], dense_fc1) for e in range(4))
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])
    # the Auto classes give the package's classes once it is imported, even with trust_remote_code: import the copy
    remote_class = get_class_from_dynamic_module("modeling_cumo.CuMoForConditionalGeneration", str(tmp_path / "dense"))
    remote = remote_class.from_pretrained(tmp_path / "dense")
    assert type(remote).__module__.startswith("transformers_modules")
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "dense", trust_remote_code=True)) is CuMoForConditionalGeneration
    with pytest.raises(TypeError, match="CuMoForConditionalGeneration.from_pretrained"):
        make_trainer(tmp_path, "vit", remote)


def test_cumo_train_runs_the_package_code_whatever_remote_code_the_checkpoint_holds(tmp_path):
    """A checkpoint's stale remote-code copy cannot change what `cumo-train` runs: here it would fail on import.
    The trained folder gets fresh copies of the package's files."""
    from pathlib import Path

    import modeling_cumo
    from trainer.train import main

    folder = tmp_path / "dense"
    tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    for name in ("modeling_cumo.py", "moe_cumo.py", "vision_cumo.py"):
        (folder / name).write_text("raise RuntimeError('stale remote code')\n")
    colour_dataset(8).save_to_disk(tmp_path / "data")
    output = tmp_path / "vit"
    main(["--model_name_or_path", str(folder), "--data_path", str(tmp_path / "data"), "--output_dir", str(output),
          "--stage", "vit", "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true",
          "--report_to", "none", "--save_strategy", "no"])
    config = json.loads((output / "config.json").read_text())
    assert config["vision_num_experts"] == 4 and config["projector_num_experts"] == 4
    package = Path(modeling_cumo.__file__).parent
    for name in ("modeling_cumo.py", "moe_cumo.py", "vision_cumo.py", "configuration_cumo.py", "processing_cumo.py"):
        assert (output / name).read_text() == (package / name).read_text(), name


def test_bzloss_weights_can_be_switched_off(tmp_path):
    model = tiny_model()
    trainer = make_trainer(tmp_path, "vit", model, balance_loss_coef=0.0, router_z_loss_coef=0.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    with torch.no_grad():
        out = model(**batch)
    assert out.vision_balance_loss > 0 and out.aux_loss.item() == 0.0
    assert model.config.balance_loss_coef == 0.0  # saved with the model


@pytest.mark.parametrize("fused", [True, False])
def test_trainer_adds_the_models_own_bzloss(tmp_path, fused):
    model = tiny_model(vision_experts=4, projector_experts=4, text="mixtral")
    extra = {} if fused else {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: cross_entropy(outputs.logits, labels)}
    with pytest.warns(FutureWarning) if not fused else contextlib.nullcontext():
        trainer = CuMoSFTTrainer(
            model=model, train_dataset=colour_dataset(), processing_class=tiny_processor(),
            args=CuMoSFTConfig(output_dir=str(tmp_path), stage="vit", report_to="none", use_cpu=True), **extra,
        )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    with torch.no_grad():
        own = model(**batch)  # the model's own loss: cross-entropy + 0.1 x balance + 0.01 x z, all three modules
        loss = trainer.compute_loss(model, dict(batch))
    assert own.text_balance_loss is not None
    assert loss.item() == pytest.approx(own.loss.item(), rel=1e-5)
    for name in ("vision_balance_loss", "projector_router_z_loss", "text_balance_loss", "text_router_z_loss"):
        assert trainer._metrics["train"][name][-1] == pytest.approx(getattr(own, name).item(), rel=1e-5)


def test_evaluation_loss_equals_the_models_loss_with_labels(tmp_path):
    """One rule for the MoE losses on every path: TRL's fused LM head keeps the labels from the model, and its
    evaluation loss is still `model(..., labels=...).loss`, bzloss included."""
    model = tiny_model(vision_experts=4, projector_experts=4, text="mixtral")
    rows = colour_dataset(3)
    trainer = CuMoSFTTrainer(
        model=model, train_dataset=rows, eval_dataset=rows, processing_class=tiny_processor(),
        args=CuMoSFTConfig(output_dir=str(tmp_path), stage="vit", report_to="none", use_cpu=True,
                           per_device_eval_batch_size=3, prediction_loss_only=True),
    )
    metrics = trainer.evaluate()
    batch = trainer.data_collator([rows[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        own = model(**batch)
    assert own.aux_loss.item() > 1e-3  # bzloss is a visible part of the loss
    assert metrics["eval_loss"] == pytest.approx(own.loss.item(), rel=1e-5)
    for name in ("vision_balance_loss", "projector_router_z_loss", "text_balance_loss"):
        assert metrics[f"eval_{name}"] == pytest.approx(getattr(own, name).item(), rel=1e-5)


def cross_entropy(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    def run(output, max_steps, resume=None, save_steps=3):
        model = tiny_model()
        trainer = make_trainer(tmp_path, "vit", model, output_dir=str(tmp_path / output), max_steps=max_steps,
                               save_strategy="steps", save_steps=save_steps)
        trainer.train(resume_from_checkpoint=resume)
        return snapshot(model)

    uninterrupted = run("full", 6)
    run("part", 3)
    resumed = run("part", 6, resume=str(tmp_path / "part" / "checkpoint-3"))
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.allclose(uninterrupted[name], resumed[name], atol=1e-6), name


def test_llava_json_and_trl_messages_give_the_same_batch(tmp_path):
    image = Image.new("RGB", (30, 22), (10, 200, 90))
    image.save(tmp_path / "leaf.png")
    record = {"id": "sample-7", "image": "leaf.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the leaf?"},
        {"from": "gpt", "value": "Green."},
        {"from": "human", "value": "Is it large?"},
        {"from": "gpt", "value": "No."},
    ]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    llava = load_llava_json(tmp_path / "data.json")
    trl = Dataset.from_list([{"messages": [
        {"role": "user", "content": "What colour is the leaf?"}, {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Is it large?"}, {"role": "assistant", "content": "No."},
    ], "images": [Image.open(tmp_path / "leaf.png")]}])
    processor = tiny_processor()
    collator = CuMoDataCollator(processor=processor, assistant_only_loss=True, image_token_id=384)
    a, b = collator([llava[0]]), collator([trl[0]])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    labelled = processor.tokenizer.decode(a["labels"][0][a["labels"][0] != -100])
    assert "Green." in labelled and "No." in labelled and "leaf" not in labelled
    assert (a["labels"][a["input_ids"] == 384] == -100).all()


def test_llava_json_batches_chats_of_similar_length_together(tmp_path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"id": str(i), "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red. " * (1 + i % 2 * 30)}]}
        for i in range(64)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = load_llava_json(tmp_path / "data.json")
    assert dataset["length"] == [4 + (1 + i % 2 * 30) for i in range(64)]  # words, as the original counts them
    trainer = make_trainer(tmp_path, "pft", tiny_model(), dataset, train_sampling_strategy="group_by_length")
    batches = list(trainer.get_train_dataloader().batch_sampler)
    # transformers sorts mega-batches of 4 batches here by length: at most one batch of each mixes short and long
    # chats (random batches of 4 would mix in 7 of 8 cases)
    assert len(batches) == 16 and sum(len({dataset["length"][i] for i in batch}) > 1 for batch in batches) <= 4
    trainer.train()


def test_bad_images_are_reported_by_sample_and_skipped_on_request(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [
        {"id": "ok", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "gone", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "corrupt", "image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="gone"):
        load_llava_json(tmp_path / "data.json")
    dataset = load_llava_json(tmp_path / "data.json", on_bad_image="skip")
    assert dataset["id"] == ["ok", "corrupt"]
    strict = CuMoDataCollator(processor=tiny_processor(), image_token_id=384)
    with pytest.raises(ValueError, match="corrupt"):
        strict([dataset[0], dataset[1]])
    lenient = CuMoDataCollator(processor=tiny_processor(), image_token_id=384, on_bad_image="skip")
    assert lenient([dataset[0], dataset[1]])["input_ids"].shape[0] == 1


def test_two_process_data_parallel_run_keeps_ranks_identical(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "ddp_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(worker), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # two ranks really ran
    initial = tiny_model().upcycle().state_dict()
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert any(not torch.equal(t, initial[n]) for n, t in ranks[0]["state"].items() if "gate" not in n)


def test_lora_on_the_language_model_keeps_its_base_weights(tmp_path):
    from peft import LoraConfig

    from trainer.train import LORA_TARGETS

    model = tiny_model()
    before = snapshot(model)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                             modules_to_save=["multi_modal_projector", "vision_tower"])
    trainer = CuMoSFTTrainer(model=model, train_dataset=colour_dataset(), processing_class=tiny_processor(),
                             peft_config=peft_config, args=CuMoSFTConfig(
                                 output_dir=str(tmp_path), stage="pft", per_device_train_batch_size=4, max_steps=3,
                                 learning_rate=2e-3, report_to="none", use_cpu=True, save_strategy="no"))
    trainer.train()
    merged = trainer.model.merge_and_unload()
    after = snapshot(merged)
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".q_proj." in n and "language_model" in n for n in changed)  # LoRA folded into the LLM's attention
    assert not any("embed_tokens" in n or "norm" in n for n in changed if "language_model" in n)
    assert any(n.startswith("model.multi_modal_projector.") for n in changed)
    assert any(n.startswith("model.vision_tower.") for n in changed)


def test_cumo_init_builds_a_dense_cumo_from_clip_and_an_llm(tmp_path):
    import shutil

    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPConfig, CLIPModel, MistralConfig, MistralForCausalLM

    from conftest import DATA
    from trainer.init_model import main

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=7),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    clip.save_pretrained(tmp_path / "clip")  # a full CLIPModel, as openai/clip-vit-large-patch14-336 is
    llm = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=384))
    llm.save_pretrained(tmp_path / "llm")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "original_ckpt" / name, tmp_path / "llm" / name)

    main(["--vision-tower", str(tmp_path / "clip"), "--llm", str(tmp_path / "llm"), "--output", str(tmp_path / "cumo"),
          "--dtype", "float32", "--scales", "1", "2"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "cumo", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "cumo", trust_remote_code=True)
    assert model.config.scales == [1, 2] and not model.config.vision_is_moe and not model.config.projector_is_moe
    assert processor.image_token_id == model.config.image_token_id == 384
    clip_layer = clip.vision_model.encoder.layers[1] if hasattr(clip, "vision_model") else clip.vision_tower.encoder.layers[1]
    assert torch.equal(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight, clip_layer.mlp.fc1.weight)
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, llm(input_ids=ids).logits)
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<s><s>[INST] <<SYS>>")
    # a SentencePiece LLM folder gets the original's tokenization: "[INST]" after the BOS reads "▁["
    assert processor(text=prompt)["input_ids"][0][:3] == [1, 1, processor.tokenizer.convert_tokens_to_ids("▁[")]


def test_moe_blocks_become_zero3_leaf_modules():
    pytest.importorskip("deepspeed")
    from deepspeed.utils import z3_leaf_module

    from trainer.sft_trainer import register_moe_leaf_modules

    model = tiny_model(vision_experts=4, projector_experts=4, text="mixtral")
    classes = {cls.__name__ for cls in register_moe_leaf_modules(model)}
    assert classes == {"CuMoSparseMLP", "MixtralSparseMoeBlock"}  # one MoE block class for the vision MLPs and projector
    assert z3_leaf_module(model.model.vision_tower.encoder.layers[0].mlp)
    assert z3_leaf_module(model.model.multi_modal_projector)
    assert z3_leaf_module(model.model.language_model.layers[0].mlp)
    assert not z3_leaf_module(model.model.vision_tower.encoder.layers[0].self_attn)
