"""The remote code works with every transformers the project supports, not only the pinned one.

A folder saved here (pinned transformers) is loaded with `trust_remote_code=True` by the Python of another
environment (the oldest and the newest supported transformers, built by `.ci/run`), where this project is not
importable. Prompts, pixels, logits and greedy tokens must equal the pinned ones, and a folder that environment saves
must load back here with the same logits. `CUMO_TRANSFORMERS_VENVS` lists the environments (os.pathsep-separated
virtualenv folders).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import tiny_model, tiny_processor


VENVS = [path for path in os.environ.get("CUMO_TRANSFORMERS_VENVS", "").split(os.pathsep) if path]
MODELS = {  # MoE vision tower and projector with Mistral; a Mixtral LM with an MoE tower and a dense projector
    "mistral-moe": dict(vision_experts=4, projector_experts=4),
    "mixtral": dict(vision_experts=4, projector_experts=0, text="mixtral"),
}
CHATS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
     {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]}],
]
MAX_NEW_TOKENS = 6

# Runs in the other environment: argv = folders..., images..., result path.
LOADER = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_cumo", "trainer", "space", "hub_upload", "evaluation"):
        sys.modules[name] = None  # the project must not be importable here
    import torch, transformers
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    folders, images, chats, max_new_tokens, out = json.loads(sys.argv[1])
    images = [Image.open(path) for path in images]
    results = {"version": transformers.__version__}
    for folder in folders:
        assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "CuMoConfig"
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        processor.tokenizer.padding_side = "left"
        prompts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        result = {"prompts": prompts, "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
        for auto in (AutoModel, AutoModelForImageTextToText):
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
            with torch.no_grad():
                result[auto.__name__] = model(**inputs).logits
        result["generated"] = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        model.save_pretrained(folder + "-resaved")
        processor.save_pretrained(folder + "-resaved")
        results[folder] = result
    torch.save(results, out)
    """
)


def _python(venv: str) -> Path:
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{venv} (from CUMO_TRANSFORMERS_VENVS) has no bin/python.")
    return python


def _inputs(processor, images):
    processor.tokenizer.padding_side = "left"
    prompts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in CHATS]
    return prompts, processor(images=images, text=prompts, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Both tiny models saved with the pinned transformers, two images, and what the pinned transformers computes."""
    root = tmp_path_factory.mktemp("versions")
    image_paths = [root / "wide.png", root / "tall.png"]
    Image.new("RGB", (40, 25), (200, 30, 60)).save(image_paths[0])
    Image.new("RGB", (18, 33), (20, 160, 90)).save(image_paths[1])
    images = [Image.open(path) for path in image_paths]
    processor = tiny_processor()
    expected = {}
    for name, kwargs in MODELS.items():
        model = tiny_model(seed=1, **kwargs)
        folder = root / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        prompts, inputs = _inputs(processor, images)
        with torch.no_grad():
            logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected[str(folder)] = dict(prompts=prompts, inputs=inputs, logits=logits, generated=generated)
    return root, image_paths, expected


@pytest.mark.parametrize("venv", VENVS or [None], ids=lambda venv: Path(venv).name if venv else "unset")
def test_remote_code_matches_the_pinned_transformers(venv, saved, tmp_path):
    if venv is None:
        pytest.skip("CUMO_TRANSFORMERS_VENVS is unset: `.ci/run` builds the environments of the oldest and the newest "
                    "supported transformers and sets it")
    root, image_paths, expected = saved
    folders = list(expected)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result_path = tmp_path / "results.pt"
    args = [folders, [str(path) for path in image_paths], CHATS, MAX_NEW_TOKENS, str(result_path)]
    run = subprocess.run([str(_python(venv)), "-c", LOADER, json.dumps(args)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = torch.load(result_path)
    version = f"transformers {results['version']} (pinned: {transformers.__version__})"

    for folder in folders:
        ours, theirs, where = expected[folder], results[folder], f"{Path(folder).name}, {version}"
        assert theirs["prompts"] == ours["prompts"], where
        assert torch.equal(theirs["input_ids"], ours["inputs"]["input_ids"]), where
        assert torch.equal(theirs["pixel_values"], ours["inputs"]["pixel_values"]), where
        for auto in ("AutoModel", "AutoModelForImageTextToText"):
            torch.testing.assert_close(theirs[auto], ours["logits"], rtol=0, atol=1e-5, msg=f"{where}, {auto}")
        assert torch.equal(theirs["generated"], ours["generated"]), where

        # what that transformers saved loads back here and computes the same
        resaved = AutoModelForImageTextToText.from_pretrained(folder + "-resaved", trust_remote_code=True).eval()
        with torch.no_grad():
            logits = resaved(**ours["inputs"]).logits
        torch.testing.assert_close(logits, ours["logits"], rtol=0, atol=1e-5, msg=f"{where}, saved there")


def test_the_model_card_states_the_minimum_that_setup_py_declares():
    from hub_upload.push import CARD_TEMPLATE

    setup = (Path(__file__).parent.parent / "setup.py").read_text()
    minimum = re.search(r'"transformers>=([0-9.]+),<[0-9.]+"', setup)
    assert minimum, "setup.py's core requirements give no transformers range"
    assert f"transformers {minimum[1]} or newer" in CARD_TEMPLATE
    assert f'"transformers>={minimum[1]}"' in CARD_TEMPLATE
