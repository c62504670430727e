"""Training CuMo with TRL through the paper's three stages: pre-training (`pt`), pre-finetuning (`pft`) and visual
instruction tuning with co-upcycled MoE blocks and bzloss (`vit`)."""

from .config import CuMoSFTConfig
from .data import CuMoDataCollator, load_llava_json
from .sft_trainer import CuMoSFTTrainer

__all__ = ["CuMoDataCollator", "CuMoSFTConfig", "CuMoSFTTrainer", "load_llava_json"]
