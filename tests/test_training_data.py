"""Bad training data is named by sample, up front, and never crashes the run deep inside the collator."""

import json
import logging

import PIL.Image
import pytest
from PIL import Image

from conftest import tiny_processor
from trainer.data import CuMoDataCollator, load_llava_json


def chat(question="<image>\nWhat is this?", answer="A square."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write(tmp_path, records):
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json"


def test_malformed_records_are_listed_in_one_message(tmp_path):
    records = [
        {"id": "good", "conversations": chat("Hi", "Hello")},
        "just a string",
        {"id": "number", "conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]},
        {"id": "no-turns"},
        {"id": "speaker", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "image-type", "image": 7, "conversations": chat()},
    ]
    with pytest.raises(ValueError) as error:
        load_llava_json(write(tmp_path, records))
    message = str(error.value)
    assert "5 of 6 records" in message
    for name in ("1: is a str", "number: turn 0 needs a text 'value'", "no-turns: has no 'conversations'",
                 "speaker: turn 0 has unknown speaker 'robot'", "image-type: 'image' must be"):
        assert name in message
    assert "good" not in message


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "data.json").write_text('[{"id": "a", ')
    with pytest.raises(ValueError, match="data.json is not valid JSON"):
        load_llava_json(tmp_path / "data.json")


def test_data_without_any_answer_fails_or_warns_on_request(tmp_path, caplog):
    path = write(tmp_path, [{"id": "a", "conversations": chat("Hi", "")}, {"id": "b", "conversations": chat("Yo", " ")}])
    with pytest.raises(ValueError, match="No sample .* has an answer"):
        load_llava_json(path)
    with caplog.at_level(logging.WARNING):
        assert len(load_llava_json(path, require_answers=False)) == 2
    assert "nothing to learn" in caplog.text


def test_a_decompression_bomb_is_named_and_skipped_on_request(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then more than twice the limit: a bomb
    dataset = load_llava_json(write(tmp_path, [{"id": "ok", "image": "good.png", "conversations": chat()},
                                               {"id": "boom", "image": "bomb.png", "conversations": chat()}]))
    strict = CuMoDataCollator(processor=tiny_processor(), image_token_id=384)
    with pytest.raises(ValueError, match="Sample 'boom'"):
        strict([dataset[0], dataset[1]])
    lenient = CuMoDataCollator(processor=tiny_processor(), image_token_id=384, on_bad_image="skip")
    assert lenient([dataset[0], dataset[1]])["input_ids"].shape[0] == 1


def test_the_vit_stage_repeats_exactly_with_the_same_seed(tmp_path):
    """Upcycling draws fresh routers: they come from the run's seed, not from whatever the global RNG held."""
    import torch

    from conftest import tiny_model
    from test_trainer import make_trainer

    losses = []
    for run in range(2):
        model = tiny_model()
        torch.manual_seed(1000 + run)  # a different global state before each run
        trainer = make_trainer(tmp_path / str(run), "vit", model, max_steps=2)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert losses[0] == losses[1]
