"""A saved CuMo folder loads through the Auto classes with `trust_remote_code=True` where this project is absent."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from PIL import Image

from conftest import tiny_model, tiny_processor


LOADER = textwrap.dedent(
    """
    import sys
    for name in ("modeling_cumo", "trainer", "space", "hub_upload"):
        sys.modules[name] = None  # this project must not be importable here, even when pip-installed
    try:
        import modeling_cumo
        raise SystemExit("the project is importable")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "CuMoConfig", type(config)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "CuMoProcessor", type(processor)
    image = Image.open(sys.argv[2])
    inputs = processor(images=[image], text=["Describe <image> briefly."], return_tensors="pt")
    results = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    for auto in (AutoModel, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "CuMoForConditionalGeneration", type(model)
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        with torch.no_grad():
            results[auto.__name__] = model(**inputs).logits
    torch.save(results, sys.argv[3])
    """
)


def test_saved_folder_loads_with_auto_classes_without_the_project(tmp_path):
    model = tiny_model(vision_experts=4, projector_experts=4)
    processor = tiny_processor()
    folder = tmp_path / "cumo-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    files = set(os.listdir(folder))
    assert {"configuration_cumo.py", "modeling_cumo.py", "moe_cumo.py", "vision_cumo.py", "processing_cumo.py"} <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= auto_map.keys()
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"].endswith("CuMoProcessor")

    image_path = tmp_path / "photo.png"
    Image.new("RGB", (40, 25), (200, 30, 60)).save(image_path)
    inputs = processor(images=[Image.open(image_path)], text=["Describe <image> briefly."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits

    assert_fresh_process_gives(expected, inputs, folder, image_path, tmp_path)


def assert_fresh_process_gives(expected, inputs, folder, image_path, tmp_path, python=sys.executable):
    """Load `folder` by remote code in a fresh `python` where this project is not importable, process `image_path`
    there, and check its ids, pixels and both Auto classes' logits against the in-memory ones."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result_path = tmp_path / "logits.pt"
    run = subprocess.run([python, "-c", LOADER, str(folder), str(image_path), str(result_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(result_path)
    assert torch.equal(results["input_ids"], inputs["input_ids"])
    assert torch.equal(results["pixel_values"], inputs["pixel_values"])
    for auto in ("AutoModel", "AutoModelForImageTextToText"):
        assert (results[auto] - expected).abs().max() <= 1e-6, auto


def test_with_the_package_installed_the_auto_classes_use_its_classes(tmp_path):
    """Without `trust_remote_code`, a folder loads with the installed package's classes: its remote-code copy (here
    broken) is never imported."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    import modeling_cumo

    folder = tmp_path / "cumo-tiny"
    tiny_model(vision_experts=4, projector_experts=4).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    for name in ("configuration_cumo.py", "modeling_cumo.py", "processing_cumo.py"):
        (folder / name).write_text("raise RuntimeError('stale remote code')\n")
    assert type(AutoConfig.from_pretrained(folder)) is modeling_cumo.CuMoConfig
    assert type(AutoProcessor.from_pretrained(folder)) is modeling_cumo.CuMoProcessor
    for auto in (AutoModel, AutoModelForImageTextToText):
        assert type(auto.from_pretrained(folder)) is modeling_cumo.CuMoForConditionalGeneration
