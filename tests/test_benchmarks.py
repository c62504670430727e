"""The benchmark scripts run from a checkout and report what they measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # memory: the experts add weights; a training step needs more than inference (gradients, saved activations)
    assert results["weights_cumo_moe_gib"] > results["weights_cumo_dense_gib"] > results["weights_llm_gib"]
    for name in ("cumo_moe", "cumo_dense"):
        assert results[f"peak_memory_train_step_{name}_gib"] > results[f"peak_memory_vision_{name}_gib"] >= 0, name


def test_peak_memory_counts_what_a_call_allocates():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory import peak_memory_gib, peak_memory_supported

    if not peak_memory_supported("cpu"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    import torch

    def allocate(gib):
        block = torch.ones(int(gib * 2**30) // 4)
        return float(block[-1])

    small, large = peak_memory_gib(lambda: allocate(0.1)), peak_memory_gib(lambda: allocate(0.4))
    assert 0.09 < small < 0.2 and 0.39 < large < 0.5


def test_original_comparison_explains_a_missing_source(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/original_vision.py", "--original-source", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "not a checkout of the original CuMo" in run.stderr
