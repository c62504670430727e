"""Resuming after a kill during a checkpoint save: the half-written checkpoint is refused with the name of the last
complete one, and `--resume_from_checkpoint last` picks that one."""

import shutil

import pytest

from conftest import tiny_model
from test_trainer import make_trainer
from trainer.train import resolve_checkpoint


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    trainer = make_trainer(tmp_path, "pft", tiny_model(), max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    output = tmp_path / "out"
    half = output / "checkpoint-4"  # what a kill during the next save leaves: weights cut short, no trainer state
    shutil.copytree(output / "checkpoint-2", half)
    (half / "trainer_state.json").unlink()
    weights = next(half.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    return output


def test_a_half_written_checkpoint_names_the_last_complete_one(run_folder):
    with pytest.raises(ValueError, match=r"checkpoint-4: it has no trainer_state.json .* last complete one is .*checkpoint-2"):
        resolve_checkpoint(str(run_folder / "checkpoint-4"), str(run_folder))


def test_last_resumes_from_the_newest_complete_checkpoint(run_folder):
    assert resolve_checkpoint("last", str(run_folder)) == str(run_folder / "checkpoint-2")
    assert resolve_checkpoint(str(run_folder / "checkpoint-2"), str(run_folder)) == str(run_folder / "checkpoint-2")
    assert resolve_checkpoint(None, str(run_folder)) is None


def test_no_complete_checkpoint_says_so(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        resolve_checkpoint("last", str(tmp_path))
