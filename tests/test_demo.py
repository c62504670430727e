"""The demo world: generated data is well formed, and a reduced end-to-end run learns far above chance."""

import argparse
import contextlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import MistralForCausalLM

from modeling_cumo.processing_cumo import CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE
from trainer.demo import attention, probe, standins, world
from trainer.demo.pipeline import Budget, build_demo


ROOT = Path(__file__).parent.parent


def test_world_questions_have_exactly_one_right_answer(tmp_path):
    stats = world.write_split(tmp_path, "train", 40, 64, seed=3)
    vqa = json.loads((tmp_path / "train_vqa.json").read_text())
    assert stats["vqa_questions"] == len(vqa) and {row["type"] for row in vqa} == set(world.VQA_TYPES)
    rng = random.Random(0)
    for _ in range(200):
        _, shapes = world.sample_scene(rng)
        assert len({s.quadrant for s in shapes}) == len(shapes) and len({(s.colour, s.shape) for s in shapes}) == len(shapes)
        for kind, question, answer in world.questions(shapes, rng):
            if kind == "colour":
                target = question.split("the ")[1].rstrip("?")
                assert [s.colour for s in shapes if s.shape == target] == [answer.rstrip(".").lower()]
            if kind == "count":
                assert answer == world.NUMBERS[len(shapes)].capitalize() + "."
    for row in vqa:
        assert row["objects"] in (1, 2, 3)
        if row["type"] == "count":
            assert row["answer"] == world.NUMBERS[row["objects"]].capitalize() + "."
    image = Image.open(tmp_path / vqa[0]["image"])
    assert image.size == (64, 64) and image.mode == "RGB"
    instructions = json.loads((tmp_path / "train_instructions.json").read_text())
    assert len(instructions) == 2 * 40  # per image: its short questions in one conversation, its description alone
    for row in instructions:
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 2
        assert turns[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in turns[1:])
        asked = {(q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(turns[::2], turns[1::2])}
        if "-describe-" in row["id"]:
            assert len(asked) == 1 and next(iter(asked))[0] == "Describe the image."
        else:  # the very questions evaluated on this image, and no description (it would give them all away)
            assert asked == {(v["question"], v["answer"]) for v in vqa if v["image"] == row["image"]}
    regions = json.loads((tmp_path / "train_regions.json").read_text())
    assert len(regions) > 40
    for row in regions[:10]:
        words = row["caption"].rstrip(".").split()
        assert words[1] in ("large", "small") and words[2] in world.COLOURS and words[3] in world.SHAPES
        assert Image.open(tmp_path / row["image"]).size == (64, 64)


def test_the_space_example_is_a_scene_of_the_world_with_the_world_s_questions_and_answers():
    committed = Image.open(ROOT / "space" / "examples" / "shapes.png")
    drawn = world.example_image()
    assert committed.size == drawn.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and committed.mode == "RGB"
    assert committed.tobytes() == drawn.tobytes(), "redraw it: python -m trainer.demo.world space/examples/shapes.png"
    background, shapes = world.EXAMPLE_SCENE
    assert background in world.BACKGROUNDS and world.parse_caption(world.caption(list(shapes))) == list(shapes)
    asked = set()  # every (question, answer) the world's data ever pairs with this scene
    for seed in range(200):
        asked |= {(q, a) for _, q, a in world.questions(list(shapes), random.Random(seed))}
    chats = world.example_chats()
    assert len(chats) == len(world.EXAMPLE_QUESTIONS) >= 2 and set(chats) <= asked, (chats, asked)
    assert ("Describe the image.", "A large red circle in the top left and a large blue square in the bottom right.") in chats


def test_space_examples_are_scored_exactly_as_the_app_shows_them(monkeypatch):
    from trainer.demo import evaluate

    given = iter([" Two. ", "Square.", "two"])  # what generate decodes: the template's spaces around the first
    monkeypatch.setattr(evaluate, "generate_answers", lambda *args, **kwargs: [next(given)])
    rows = evaluate.space_examples(None, None, world.example_image(), world.example_chats())
    assert [(row["question"], row["expected"]) for row in rows] == world.example_chats()
    assert [row["answer"] for row in rows] == ["Two.", "Square.", "two"]
    assert [row["right"] for row in rows] == [True, False, False]


def test_expert_load_has_each_moe_layer_s_share_of_the_routing_slots(tmp_path):
    from conftest import tiny_model, tiny_processor
    from trainer.demo import evaluate

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (28, 28), (80 * i, 50, 90)).save(images[-1])
    load = evaluate.expert_load(tiny_model(vision_experts=4, projector_experts=4), tiny_processor(), images)
    assert list(load) == ["vision layer 0", "vision layer 1", "vision layer 2", "projector"]
    assert all(len(shares) == 4 and abs(sum(shares) - 1) < 1e-6 for shares in load.values())
    assert evaluate.expert_load(tiny_model(), tiny_processor(), images) == {}  # dense: no routers


def test_asked_object_is_the_one_whose_attribute_answers_the_question():
    rng = random.Random(4)
    checked = 0
    for _ in range(300):
        _, shapes = world.sample_scene(rng)
        for kind, question, answer in world.questions(shapes, rng):
            target = world.asked_object(kind, question, shapes)
            if kind in ("count", "exists", "describe"):
                assert target is None
                continue
            fact = {"colour": target.colour, "shape": target.shape, "position": world.QUADRANTS[target.quadrant]}[kind]
            assert answer == fact.capitalize() + "."
            checked += 1
    assert checked > 600


def test_attention_selectivity_is_zero_for_an_even_look_and_one_for_the_asked_object_alone():
    assert world.token_quadrants(16) == [0, 0, 1, 1] * 2 + [2, 2, 3, 3] * 2  # a 4x4 grid, row-major
    quadrant_of = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    even = torch.full((8,), 0.1)  # 0.8 of the attention on the image, spread evenly
    assert attention.selectivity(even, quadrant_of, target=1, others=[2, 3]).abs() < 1e-6
    only_target = torch.tensor([0, 0, 0.3, 0.2, 0, 0, 0, 0])
    assert torch.isclose(attention.selectivity(only_target, quadrant_of, target=1, others=[0]), torch.tensor(1.0))
    wrong = torch.tensor([0.25, 0.25, 0, 0, 0, 0, 0.25, 0.25])  # on the other two objects, none on the asked one
    assert torch.isclose(attention.selectivity(wrong, quadrant_of, target=1, others=[0, 3]), torch.tensor(-0.5))
    batched = torch.stack([even, only_target])  # (heads, image tokens) at once
    assert torch.allclose(attention.selectivity(batched, quadrant_of, 1, [0]), torch.tensor([0.0, 1.0]), atol=1e-6)


def test_scene_chats_answer_about_the_scene_they_carry():
    chats = world.scene_chats(90, seed=5)
    assert chats == world.scene_chats(90, seed=5) and chats != world.scene_chats(90, seed=6)
    assert 15 <= sum(plain for _, _, plain in chats) <= 45  # about one in three is a plain caption
    for shapes, messages, plain in chats:
        assert messages[0]["content"][0] == {"type": "image"} and all(m["content"][0]["type"] == "text" for m in messages[2::2])
        answers = [m["content"] for m in messages[1::2]]
        if plain:
            assert answers == [world.caption(shapes)]
            continue
        present = {(s.colour, s.shape): s for s in shapes}
        for question, answer in zip((m["content"][-1]["text"] for m in messages[::2]), answers):
            if question.startswith("How many"):
                assert answer == world.NUMBERS[len(shapes)].capitalize() + "."
            if question.startswith("Is there a "):
                assert (answer == "Yes.") == (tuple(question[len("Is there a "):-1].split()) in present)
            if question.startswith("Where is the "):
                assert answer == world.QUADRANTS[present[tuple(question[len("Where is the "):-1].split())].quadrant].capitalize() + "."


def test_colour_lookup_chats_ask_the_colour_of_every_object_found_by_its_shape():
    chats = world.colour_lookup_chats(60, seed=4)
    assert len(chats) == 60 and chats == world.colour_lookup_chats(60, seed=4)
    for shapes, messages, plain in chats:
        assert not plain and len(shapes) >= 2 and messages[0]["content"][0] == {"type": "image"}
        unique = [s for s in shapes if [t.shape for t in shapes].count(s.shape) == 1]
        asked = {}
        for question, answer in zip((m["content"][-1]["text"] for m in messages[::2]), (m["content"] for m in messages[1::2])):
            target = world.asked_object("colour", question, shapes)
            assert target is not None and answer == target.colour.capitalize() + "."
            asked[target] = answer
        assert set(asked) == set(unique)  # every object its shape names, once


def test_fit_draws_the_first_steps_from_the_first_rows_only():
    model = torch.nn.Linear(1, 1)
    drawn = []

    def loss_of(index):
        drawn.append(index)
        return model.weight.sum() * 0 + model.bias.sum()

    standins._fit(model, loss_of, count=20, steps=6, batch_size=50, lr=1e-3, seed=0, desc="test", first=(2, 5))
    assert all(int(index.max()) < 5 for index in drawn[:2])
    assert all(int(index.min()) >= 5 for index in drawn[2:]) and max(int(index.max()) for index in drawn) == 19


def scene_tokenizer(chats, folder):
    """A tokenizer trained on scene chats' captions and messages: every world word the scene tokens use."""
    texts = [world.caption(shapes) for shapes, _, _ in chats] + [m["content"] if isinstance(m["content"], str) else
                                                                 m["content"][-1]["text"] for _, ms, _ in chats for m in ms]
    return standins.train_tokenizer(texts, folder)


def test_bf16_stand_ins_are_the_default_where_the_cpu_has_bf16_and_refused_where_it_would_emulate_it(monkeypatch):
    from trainer.demo.pipeline import FULL, add_budget_arguments, budget_from_args, stand_in_dtype

    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    for capabilities, native in (({}, False), ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        assert standins.has_native_bf16() is native
        args = parser.parse_args(["--quick", "--stand-in-dtype", "bfloat16"])
        if native:
            assert budget_from_args(args).stand_in_dtype == "bfloat16"
        else:
            with pytest.raises(SystemExit, match="neither AMX nor AVX512-BF16"):
                budget_from_args(args)
        default = "bfloat16" if native else "float32"
        assert budget_from_args(parser.parse_args(["--quick"])).stand_in_dtype == default
        assert stand_in_dtype(FULL) == getattr(torch, default)
        assert budget_from_args(parser.parse_args(["--stand-in-dtype", "float32"])).stand_in_dtype == "float32"


def test_stand_in_attention_runs_outside_autocast_and_the_checkpoint_names_plain_sdpa(tmp_path, monkeypatch):
    from transformers import AttentionInterface

    seen, arriving = [], []
    sdpa, registered = torch.nn.functional.scaled_dot_product_attention, AttentionInterface._global_mapping["sdpa_float32"]

    def recording(query, *args, **kwargs):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(query, *args, **kwargs)

    def arrival(module, query, *args, **kwargs):  # the attention is called with bf16 autocast on
        arriving.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return registered(module, query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa_float32", arrival)
    chats = world.scene_chats(8, seed=1)
    tokenizer = scene_tokenizer(chats, tmp_path / "tokenizer")
    scenes = standins.SceneBatches(tokenizer, chats, image_tokens=4)
    model = standins.train_llm(scenes, tokenizer, tmp_path / "llm", steps=2, batch_size=2, dtype=torch.bfloat16)
    assert len(seen) == 2 * model.config.num_hidden_layers  # every layer in each of the two steps
    assert all(entry == (torch.float32, False) for entry in seen)
    assert len(arriving) == len(seen) and all(arriving)
    assert model.config._attn_implementation == "sdpa"
    reloaded = MistralForCausalLM.from_pretrained(tmp_path / "llm")
    assert reloaded.config._attn_implementation == "sdpa"
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_scene_words_put_each_object_in_the_tokens_of_its_quadrant():
    shapes = [world.Shape("red", "circle", True, 0), world.Shape("blue", "square", False, 3)]
    words = world.scene_words(shapes, 16)  # a 4 x 4 grid: quadrant 0 is tokens 0, 1, 4, 5
    assert words[0] == words[5] == ["large", "red", "circle", "top", "left"]
    assert words[15] == words[10] == ["small", "blue", "square", "bottom", "right"]
    assert words[2] == words[8] == []


def test_parse_caption_reads_back_every_scene():
    rng = random.Random(3)
    for _ in range(200):
        _, shapes = world.sample_scene(rng)
        assert world.parse_caption(world.caption(shapes)) == shapes


def test_llm_standin_scene_batches_put_the_scene_words_where_the_image_is(tmp_path):
    chats = world.scene_chats(6, seed=1)
    tokenizer = scene_tokenizer(chats, tmp_path / "tokenizer")
    scenes = standins.SceneBatches(tokenizer, chats, image_tokens=16)
    embeddings = torch.nn.Embedding(len(tokenizer), 8)
    index = torch.tensor([4, 0, 2])
    batch = scenes.batch(index, embeddings)
    assert batch["inputs_embeds"].shape[:2] == batch["labels"].shape == batch["attention_mask"].shape
    for row, i in enumerate(index.tolist()):
        shapes, messages, plain = chats[i]
        template = PLAIN_CHAT_TEMPLATE if plain else CHAT_TEMPLATE
        ids = torch.tensor(tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True)["input_ids"])
        at = int((ids == tokenizer.convert_tokens_to_ids("<image>")).nonzero()[0])
        length = len(ids) - 1 + 16
        assert batch["attention_mask"][row].sum() == length and batch["attention_mask"][row, 0] == 1  # padded on the right
        assert torch.equal(batch["inputs_embeds"][row, :at], embeddings(ids[:at]))
        for t, words in enumerate(world.scene_words(shapes, 16)):  # each image token: the sum of its words
            expected = sum((embeddings.weight[tokenizer.convert_tokens_to_ids("Ġ" + w)] for w in words), torch.zeros(8))
            assert torch.allclose(batch["inputs_embeds"][row, at + t], expected)
        assert torch.equal(batch["inputs_embeds"][row, at + 16:length], embeddings(ids[at + 1:]))
        labelled = tokenizer.decode(batch["labels"][row][batch["labels"][row] != -100])  # the answers, and only they
        assert labelled.replace("</s>", "").split() == " ".join(m["content"] for m in messages[1::2]).split()


def test_stand_in_float32_attention_computes_what_transformers_sdpa_does(tmp_path, monkeypatch):
    """Its padding and causal masks included: float32 runs repeat the figures measured before it existed."""
    chats = world.scene_chats(24, seed=1)
    tokenizer = scene_tokenizer(chats, tmp_path / "tokenizer")
    scenes = standins.SceneBatches(tokenizer, chats, image_tokens=4)
    trained = standins.train_llm(scenes, tokenizer, tmp_path / "a", steps=3, batch_size=8)
    monkeypatch.setattr(standins, "float32_attention", contextlib.nullcontext)
    plain = standins.train_llm(scenes, tokenizer, tmp_path / "b", steps=3, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), plain.state_dict().values()))


def test_llm_standin_scene_batches_refuse_a_tokenizer_without_the_world_s_words(tmp_path):
    chats = world.scene_chats(4, seed=1)
    tokenizer = standins.train_tokenizer(["What colour is it?"], tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="no single token for some of the world's words"):
        standins.SceneBatches(tokenizer, chats, image_tokens=16)


def test_llm_standin_attention_starts_as_similarity_search():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    standins.start_attention_as_similarity(model)
    for layer in model.model.layers:  # heads 0, 1 share key head 0; heads 2, 3 key head 1 (head size 8)
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        assert torch.equal(q[0:8], k[0:8]) and torch.equal(q[8:16], k[0:8]) and torch.equal(q[24:32], k[8:16])
        assert not torch.equal(q[16:24], k[0:8])


class NextTokenReader(torch.nn.Module):
    """A stand-in for the LLM stand-in that reads its answer off teacher-forced one-hot inputs: the token `ahead`
    places on (1: the next token, always right; 0: the current one, always wrong)."""

    def __init__(self, vocab: int, ahead: int):
        super().__init__()
        self.embed, self.ahead = torch.nn.Embedding.from_pretrained(torch.eye(vocab)), ahead

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask):
        return SimpleNamespace(logits=torch.roll(inputs_embeds, -self.ahead, dims=1))


def test_llm_standin_lookup_probe_scores_each_question_type_on_its_answer_tokens(tmp_path):
    rows = standins.probe_chats(12, seed=3)
    assert {kind for kind, _ in rows} == set(world.VQA_TYPES) and all(len(shapes) >= 2 for _, (shapes, _, _) in rows)
    texts = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"] for _, (_, ms, _) in rows for m in ms]
    tokenizer = standins.train_tokenizer(texts + [world.caption(shapes) for _, (shapes, _, _) in rows], tmp_path / "tokenizer")
    right = standins.lookup_accuracy(NextTokenReader(len(tokenizer), 1), tokenizer, 16, questions=12, seed=3)
    wrong = standins.lookup_accuracy(NextTokenReader(len(tokenizer), 0), tokenizer, 16, questions=12, seed=3)
    assert right == {kind: 1.0 for kind in world.VQA_TYPES} and wrong == {kind: 0.0 for kind in world.VQA_TYPES}


def test_lookup_trace_trains_the_llm_standin_as_the_demo_does_and_probes_it_on_schedule(tmp_path):
    from trainer.demo import lookups

    budget = Budget(train_images=40, heldout_images=4, clip_steps=1, llm_steps=5, pt_steps=1, pft_steps=1,
                    vit_steps=1, patch_size=16, llm_colour_steps=2)
    probes = lookups.trace(tmp_path, budget, seed=0, every=2, log=lambda line: None)
    assert [p["step"] for p in probes] == [2, 4, 5]  # every 2 steps and the last
    assert all(set(p) == {"step", *world.VQA_TYPES} for p in probes)
    assert json.loads((tmp_path / "lookups.json").read_text())["probes"] == probes
    assert (tmp_path / "llm" / "config.json").is_file()


def test_reduced_pipeline_learns_far_above_chance(tmp_path):
    # about 2 minutes on 2 CPU cores: too small a budget to answer the Space's examples right, large enough to learn
    budget = Budget(train_images=500, heldout_images=60, clip_steps=120, llm_steps=60, pt_steps=30, pft_steps=60,
                    vit_steps=200)
    metrics = build_demo(tmp_path, budget, seed=0)
    # 280 held-out questions: chance accuracy's spread is about 0.03, so +0.12 is four of them
    assert metrics["vqa_accuracy"] >= metrics["chance_accuracy"] + 0.12, metrics
    for layer, shares in metrics["expert_load"].items():
        assert abs(sum(shares) - 1) < 1e-6 and len(shares) == 4, layer
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "expert_load.png").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["vqa_accuracy"] == metrics["vqa_accuracy"] and set(saved["accuracy_per_type"]) == set(world.VQA_TYPES)
    # the budget's "auto" stand-in dtype is recorded as what this CPU ran
    assert saved["budget"]["stand_in_dtype"] == ("bfloat16" if standins.has_native_bf16() else "float32")
    lookups = saved["llm_standin_lookups"]  # the LLM stand-in's answers on scenes in words, probed before any image
    assert set(lookups) == set(world.VQA_TYPES) and all(0 <= share <= 1 for share in lookups.values()), lookups
    # the Space's examples, asked as the app asks them, each scored against the world's answer
    assert [(e["question"], e["expected"]) for e in saved["space_examples"]] == world.example_chats()
    assert all(e["right"] == (e["answer"] == e["expected"]) and e["answer"] == e["answer"].strip()
               for e in saved["space_examples"])
    # whole descriptions, one per held-out image, scored apart from the VQA figure
    assert saved["descriptions"] == budget.heldout_images and 0 <= saved["description_exact_match"] <= 1
    for kind, by_objects in saved["accuracy_per_type_and_objects"].items():  # the per-type figure, split by shapes
        assert set(by_objects) <= {"1", "2", "3"} and min(by_objects.values()) <= saved["accuracy_per_type"][kind] <= max(by_objects.values())
    # the image tokens under an object say its colour (read from pixels at every budget); a probe fed misaligned
    # tokens and labels would score the majority class
    facts = probe.run_probes(tmp_path / "model", tmp_path / "work" / "data", train_images=200, heldout_images=60)
    assert facts["colour"]["probe_accuracy"] >= facts["colour"]["majority_class"] + 0.4, facts
    assert all(0 <= facts[fact]["probe_accuracy"] <= 1 for fact in probe.FACTS)
    looks = attention.measure(tmp_path / "model", tmp_path / "work" / "data", questions=12)
    assert looks["questions"] == 12 and len(looks["layers"]) == 4  # the LLM stand-in's layers
    assert all(-1 <= layer["question_best"]["selectivity"] <= 1 for layer in looks["layers"])


def test_ablations_run_all_four_variants_and_keep_only_numbers(tmp_path):
    from trainer.demo.ablations import VARIANTS, run_ablations

    budget = Budget(train_images=60, heldout_images=10, clip_steps=5, llm_steps=5, pt_steps=2, pft_steps=2, vit_steps=3)
    report = run_ablations(tmp_path, budget, log=lambda *args: None)
    results = report["variants"]
    assert list(results) == list(VARIANTS)
    assert results["dense"]["expert_load"] == {} and results["dense"]["expert_share_min"] is None
    for name in list(VARIANTS)[1:]:
        assert len(results[name]["expert_load"]) == 5  # 4 CLIP layers and the projector of the demo model
        assert all(abs(sum(shares) - 1) < 1e-6 for shares in results[name]["expert_load"].values())
    assert json.loads((tmp_path / "ablations.json").read_text())["variants"].keys() == results.keys()
    assert (tmp_path / "ablations.md").read_text().count("\n|") == len(VARIANTS) + 1
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["clip", "data", "init", "llm", "pft", "pt", "tokenizer"]


def test_patch_objects_name_the_object_in_each_patch_s_quadrant():
    objects = world.object_texts()
    assert len(objects) == len(set(objects)) == 2 * len(world.COLOURS) * len(world.SHAPES)
    shapes = [world.Shape("red", "circle", True, 0), world.Shape("blue", "triangle", False, 3)]
    patches = world.patch_objects(world.caption(shapes), objects, 16)  # a 4x4 grid: 2x2 patches per quadrant
    red, blue = objects.index("A large red circle."), objects.index("A small blue triangle.")
    assert patches == [red, red, -1, -1, red, red, -1, -1, -1, -1, blue, blue, -1, -1, blue, blue]
    for crop, text in world.region_crops(world.example_image(), list(world.EXAMPLE_SCENE[1])):
        assert world.patch_objects(text, objects, 4) == [objects.index(text)] * 4


def test_clip_standin_patch_loss_trains_the_feature_layer_cumo_reads():
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                           image_size=16, patch_size=8),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=20, max_position_embeddings=8),
        projection_dim=8))
    pixels = torch.randn(2, 3, 16, 16)
    text = {"input_ids": torch.tensor([[3, 4, 2], [5, 6, 2]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    patches = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    targets = torch.tensor([[0, 1, -1, -1], [-1, -1, -1, -1]])
    loss = standins.patch_loss(model, patches, targets, text)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    layers = model.vision_model.encoder.layers
    assert layers[0].mlp.fc1.weight.grad.abs().sum() > 0 and layers[-1].mlp.fc1.weight.grad is None  # layer -2's tokens
    # only the labelled patches count: changing an unlabelled one leaves the loss as it is
    changed = patches.detach().clone()
    changed[:, 2:] += 1
    assert torch.allclose(standins.patch_loss(model, changed, targets, text), loss)


def test_demo_records_the_machine_and_versions_that_gave_its_figures():
    from trainer.demo.evaluate import environment

    machine = environment()
    assert machine["cpu"] and machine["torch_threads"] == torch.get_num_threads() >= 1
    assert machine["torch"] == torch.__version__ and machine["transformers"] and machine["trl"]


def test_demo_seeds_summary_gives_each_figure_s_mean_and_range():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from demo_seeds import figures, spread, table

    def metrics(vqa, shape):
        return {"vqa_accuracy": vqa, "description_exact_match": 0.9, "minutes": 14.0,
                "accuracy_per_type": {"colour": 0.9, "shape": shape, "count": 1.0, "position": 0.8, "exists": 0.9}}

    runs = [{"seed": seed, **figures(metrics(vqa, shape))} for seed, vqa, shape in ((0, 0.93, 0.99), (1, 0.90, 0.9))]
    summary = spread(runs)
    assert summary["vqa_accuracy"]["min"] == 0.90 and summary["vqa_accuracy"]["max"] == 0.93
    assert abs(summary["vqa_accuracy"]["mean"] - 0.915) < 1e-9 and summary["shape"]["min"] == 0.9
    assert "| mean (min-max) | 0.915 (0.9-0.93) |" in table(runs, summary)


def test_demo_seeds_passes_cumo_demo_flags_after_a_double_dash_to_every_run(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from demo_seeds import demo_command, parse_args

    args = parse_args(["--seeds", "1", "2", "--quick", "--", "--patch-size", "16", "--llm-colour-steps", "20"])
    assert args.seeds == [1, 2] and args.quick and args.demo_args == ["--patch-size", "16", "--llm-colour-steps", "20"]
    command = demo_command(tmp_path / "seed-2", 2, args)
    assert command[1:3] == ["-m", "trainer.demo"] and command[command.index("--seed") + 1] == "2"
    assert command[-5:] == ["--quick", "--patch-size", "16", "--llm-colour-steps", "20"]
    assert parse_args([]).demo_args == []
    with pytest.raises(SystemExit):  # a cumo-demo flag without the double dash is refused, not silently dropped
        parse_args(["--patch-size", "16"])



def test_clip_standin_trains_its_patch_tokens_with_the_patch_loss(tmp_path, monkeypatch):
    world.write_split(tmp_path, "train", 4, world.IMAGE_SIZE, seed=0)
    tokenizer = standins.train_tokenizer(world.corpus(tmp_path, "train"), tmp_path / "tokenizer")
    rows = json.loads((tmp_path / "train_captions.json").read_text())
    captions = [row["conversations"][1]["value"] for row in rows]
    objects, grid = world.object_texts(), (world.IMAGE_SIZE // 8) ** 2
    seen, patch_loss = [], standins.patch_loss

    def recording(model, patches, targets, object_text):
        seen.append((patches.shape, targets.clone()))
        return patch_loss(model, patches, targets, object_text)

    monkeypatch.setattr(standins, "patch_loss", recording)
    patches = [world.patch_objects(text, objects, grid) for text in captions]
    standins.train_clip([tmp_path / row["image"] for row in rows], captions, tokenizer, tmp_path / "clip",
                        world.IMAGE_SIZE, 8, steps=2, batch_size=4, patch_objects=patches, objects=objects)
    assert len(seen) == 2  # every step: the patch tokens (CLS left out) of each image, with their objects
    for shape, targets in seen:
        assert shape[:2] == (4, grid) and targets.shape == (4, grid)
        assert all(row in patches for row in targets.tolist())


def test_patch_size_option_reaches_every_stage_and_rejects_sizes_that_do_not_tile_quadrants(tmp_path):
    import argparse

    from trainer.demo import pipeline

    parser = argparse.ArgumentParser()
    pipeline.add_budget_arguments(parser)
    assert pipeline.budget_from_args(parser.parse_args([])).patch_size == 8
    budget = pipeline.budget_from_args(parser.parse_args(["--quick", "--patch-size", "16"]))
    assert budget.patch_size == 16 and budget.vit_steps == pipeline.QUICK.vit_steps
    for bad in ("12", "64", "-8"):
        with pytest.raises(SystemExit, match="tile each quadrant"):
            pipeline.budget_from_args(parser.parse_args(["--patch-size", bad]))
    for bad in ("700", "900", "-1"):  # the colour-first steps are part of the LLM stand-in's 700
        with pytest.raises(SystemExit, match="below --llm-steps"):
            pipeline.budget_from_args(parser.parse_args(["--llm-colour-steps", bad]))
    assert pipeline.budget_from_args(parser.parse_args(["--llm-colour-steps", "200"])).llm_colour_steps == 200
    assert pipeline.budget_from_args(parser.parse_args(["--llm-colour-steps", "0"])).llm_colour_steps == 0  # not the default
    for flag in ("--vit-steps", "--train-images"):
        with pytest.raises(SystemExit, match="at least 1"):
            pipeline.budget_from_args(parser.parse_args([flag, "0"]))
    tiny = Budget(train_images=8, heldout_images=4, clip_steps=1, llm_steps=1, pt_steps=1, pft_steps=1, vit_steps=1,
                  patch_size=16)
    pipeline.build_until_vit(tmp_path, tiny, seed=0, laps=pipeline.Laps(log=lambda _: None))
    saved = json.loads((tmp_path / "pft" / "config.json").read_text())
    assert saved["vision_config"]["patch_size"] == 16 and saved["vision_config"]["image_size"] == world.IMAGE_SIZE
