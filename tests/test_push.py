"""Publishing: a dry run stages a complete model folder and Space without touching the network."""

import os
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from hub_upload import push
from hub_upload.random_checkpoint import build
from test_remote_code import LOADER


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    model = build(root / "cumo")
    push.main([str(model), "--repo-id", "someone/cumo-tiny", "--space", "--dry-run", "--stage-dir", str(root / "stage"),
               "--base-model", "shi-labs/CuMo-mistral-7b"])
    return root


def test_dry_run_makes_no_network_call(tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("network access in a dry run")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    push.main([str(build(tmp_path / "cumo")), "--repo-id", "a/b", "--space", "--dry-run", "--stage-dir",
               str(tmp_path / "stage")])
    assert (tmp_path / "stage" / "model" / "model.safetensors").is_file()


def test_model_card_metadata(staged):
    card = ModelCard.load(staged / "stage" / "model" / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-text-to-text" and data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0" and data["base_model"] == ["shi-labs/CuMo-mistral-7b"]
    assert {"cumo", "custom_code", "mixture-of-experts"} <= set(data["tags"])
    assert 'AutoModelForImageTextToText.from_pretrained("someone/cumo-tiny", trust_remote_code=True)' in card.text


def test_staged_model_loads_where_the_project_is_absent(staged, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (30, 20), "green").save(image)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", LOADER, str(staged / "stage" / "model"), str(image),
                          str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_usage_snippet_in_the_card_runs(staged, tmp_path):
    card = ModelCard.load(staged / "stage" / "model" / "README.md")
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"someone/cumo-tiny"', repr(str(staged / "stage" / "model")))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_space_front_matter(staged):
    text = (staged / "stage" / "space" / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py" and metadata["sdk_version"]
    assert metadata["license"] == "apache-2.0" and metadata["models"] == ["someone/cumo-tiny"]
    files = {p.relative_to(staged / "stage" / "space").as_posix() for p in (staged / "stage" / "space").rglob("*")}
    assert {"app.py", "requirements.txt", "README.md", "examples/shapes.png"} <= files
    assert "someone/cumo-tiny-chat" in text


def test_refuses_a_folder_that_is_not_cumo(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(SystemExit, match="not a CuMo model"):
        push.main([str(tmp_path), "--repo-id", "a/b", "--dry-run"])
