"""The benchmark scripts run from a checkout and report what they measured."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_speed_runs_on_the_tiny_config(tmp_path):
    output = tmp_path / "speed.json"
    subprocess.run([sys.executable, "benchmarks/model_speed.py", "--config", "tiny", "--repeats", "1",
                    "--new-tokens", "4", "--output", str(output)], cwd=ROOT, check=True, capture_output=True)
    results = json.loads(output.read_text())["results"]
    for key in ("vision_moe_auto_s", "vision_dense_s", "decode_cumo_moe_tokens_per_s", "decode_llm_tokens_per_s",
                "train_step_moe_s", "train_step_dense_s", "chat8_batched_s"):
        assert results[key] > 0, key
    assert results["decode_cumo_over_llm"] == results["decode_cumo_moe_tokens_per_s"] / results["decode_llm_tokens_per_s"]


def test_original_comparison_explains_a_missing_source(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/original_vision.py", "--original-source", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "not a checkout of the original CuMo" in run.stderr
