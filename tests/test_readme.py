"""The README's examples run as written (in a scratch folder)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def blocks(section: str, language: str) -> list[str]:
    text = README.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quick_start_runs(tmp_path):
    for block in blocks("Quick start", "bash"):
        run(["bash", "-ec", block], tmp_path)
    for block in blocks("Quick start", "python"):
        assert run([sys.executable, "-c", block], tmp_path).stdout.strip(), "the example printed no answer"


def test_the_three_training_stages_run_from_the_readme(tmp_path):
    toy_run = blocks("Train with TRL", "bash")[0]
    for recipe in ("pt", "pft", "vit"):  # the commands name the recipes relative to the repository
        toy_run = toy_run.replace(f"trainer/recipes/{recipe}.yaml", str(ROOT / f"trainer/recipes/{recipe}.yaml"))
    run(["bash", "-ec", toy_run], tmp_path)
    import json

    config = json.loads((tmp_path / "toy" / "vit" / "config.json").read_text())
    assert config["vision_num_experts"] == 4 and config["projector_num_experts"] == 4
    for stage in ("pt", "pft", "vit"):
        assert (tmp_path / "toy" / stage / "model.safetensors").is_file(), stage


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload", "fsdp"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "trainer" / "accelerate" / f"{name}.yaml"))
    # class names in a config break the stages whose model lacks them (a dense pft has no MoE block): the trainer
    # registers the MoE leaf modules, and FSDP wraps the model's own _no_split_modules
    assert "deepspeed_moe_layer_cls_names" not in (config.deepspeed_config or {})
    assert "fsdp_transformer_layer_cls_to_wrap" not in (config.fsdp_config or {})
    assert config.num_processes > 1


def test_the_app_command_serves_the_readme_client_example(tmp_path):
    import socket
    import time

    run(["bash", "-ec", blocks("Quick start", "bash")[0]], tmp_path)  # writes cumo-random
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = blocks("Chat in a Gradio app, locally or as a Space", "bash")[0].split("#")[0].split()
    assert command[:3] == ["python", "-m", "space.app"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, *command[1:], "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(120):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, server.stderr.read()[-3000:]
            time.sleep(0.5)
        example = blocks("Chat in a Gradio app, locally or as a Space", "python")[0]
        example = example.replace("http://127.0.0.1:7860/", f"http://127.0.0.1:{port}/")
        example = example.replace('"space/examples/shapes.png"', repr(str(ROOT / "space/examples/shapes.png")))
        result = run([sys.executable, "-c", example + "\nprint(answer)"], tmp_path)
        assert result.stdout.strip() and "⚠️" not in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_publish_dry_run_from_the_readme(tmp_path):
    run(["bash", "-ec", blocks("Quick start", "bash")[0]], tmp_path)
    dry_run = blocks("Publish a model and its Space", "bash")[0].splitlines()[0].split("#")[0]
    assert "--dry-run" in dry_run
    output = run(["bash", "-ec", dry_run], tmp_path).stdout
    assert "Dry run: nothing uploaded." in output and (tmp_path / "staged" / "space" / "app.py").is_file()
