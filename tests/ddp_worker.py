"""Run by test_trainer.py under torchrun: a short vit run on CPU (gloo); each rank saves its final weights."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model, tiny_processor  # noqa: E402
from test_trainer import colour_dataset  # noqa: E402
from trainer import CuMoSFTConfig, CuMoSFTTrainer  # noqa: E402


def main(output: str):
    model = tiny_model()
    args = CuMoSFTConfig(output_dir=output, stage="vit", per_device_train_batch_size=2, max_steps=3,
                         learning_rate=2e-3, report_to="none", use_cpu=True, save_strategy="no", ddp_backend="gloo",
                         seed=0)
    trainer = CuMoSFTTrainer(model=model, args=args, train_dataset=colour_dataset(12), processing_class=tiny_processor())
    trainer.train()
    rank, world = int(os.environ["RANK"]), torch.distributed.get_world_size()
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"world_size": world, "state": state}, Path(output) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
