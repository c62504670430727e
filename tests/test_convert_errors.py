"""The converter refuses damaged or inconsistent checkpoints before writing anything, in the user's terms, and
cleans up after an interrupted run."""

import json
import shutil

import pytest

from conftest import DATA
from hub_upload.convert_original import ConversionError, convert


@pytest.fixture
def original(tmp_path):
    folder = tmp_path / "original_ckpt"
    shutil.copytree(DATA / "original_ckpt", folder)
    shutil.copytree(DATA / "vision_tower", tmp_path / "vision_tower")
    return folder


def outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out")))


def test_tensor_shapes_that_disagree_with_the_config_are_refused(original, tmp_path):
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps(dict(config, vocab_size=config["vocab_size"] + 16)))
    with pytest.raises(ConversionError, match=r"embed_tokens.weight is \[384, 64\], the config gives \[400, 64\]"):
        convert(original, tmp_path / "out")
    assert outputs(tmp_path) == []


def test_truncated_weights_are_named(original, tmp_path):
    weights = original / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match="model.safetensors is truncated or corrupt"):
        convert(original, tmp_path / "out")
    assert outputs(tmp_path) == []


def test_an_interrupted_conversion_leaves_nothing_behind_on_the_next_run(original, tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"\0" * 1024)
    convert(original, tmp_path / "out")
    assert outputs(tmp_path) == ["out"]
