"""`CuMoSFTConfig`: TRL's `SFTConfig` plus the paper's training stage and the co-upcycling settings."""

from dataclasses import dataclass, field
from typing import Literal

import torch
from trl import SFTConfig


STAGES = ("pt", "pft", "vit")


@dataclass
class CuMoSFTConfig(SFTConfig):
    r"""
    stage (`str`): the paper's training stage (§3.3, Table 6).
        - `"pt"`: pre-training; only the projector trains, dense blocks, `plain` format (image, then the caption).
        - `"pft"`: pre-finetuning; everything trains, dense blocks, chat format.
        - `"vit"`: visual instruction tuning; a dense model is co-upcycled first, everything trains, bzloss on. On a
          model that is already MoE this is a plain fine-tune.
    upcycle_num_experts, upcycle_num_experts_per_tok (`int`): MoE shape made by co-upcycling in the `vit` stage.
    upcycle_vision, upcycle_projector (`bool`): which dense blocks the `vit` stage upcycles (the paper: both).
    upcycle_experts_init (`str`): `"copy"` (co-upcycling: experts are copies of the dense MLP) or `"random"` (MoE
        blocks trained from scratch, the paper's Table 3a baseline).
    balance_loss_coef, router_z_loss_coef (`float`, *optional*): override the model config's bzloss weights
        (0 and 0 train without bzloss); saved into the trained model's config.
    on_bad_image (`str`): an unreadable image fails the run (`"error"`) or drops its sample with a warning (`"skip"`).

    Differences from `SFTConfig`'s defaults: `assistant_only_loss=True` (loss on answers and captions only; image
    tokens never carry labels anyway), `router_aux_loss_coef=0.0` (CuMo adds its own bzloss, with the coefficients of
    the model config), `bf16` only where the hardware supports it, `remove_unused_columns=False`, and
    `ddp_find_unused_parameters=True` (a batch without images leaves the vision tower unused).
    """

    stage: Literal["pt", "pft", "vit"] = field(default="vit", metadata={"help": "Training stage: pt, pft or vit."})
    upcycle_num_experts: int = field(default=4, metadata={"help": "Experts per MoE block made in the vit stage."})
    upcycle_num_experts_per_tok: int = field(default=2, metadata={"help": "Top-k of the MoE blocks made in vit."})
    upcycle_vision: bool = field(default=True, metadata={"help": "vit stage: upcycle the vision encoder's MLPs."})
    upcycle_projector: bool = field(default=True, metadata={"help": "vit stage: upcycle the projector."})
    upcycle_experts_init: Literal["copy", "random"] = field(
        default="copy", metadata={"help": "vit stage: experts copied from the dense MLP (copy) or from scratch (random)."}
    )
    balance_loss_coef: float | None = field(default=None, metadata={"help": "Override the model's bzloss balance weight."})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "Override the model's bzloss z weight."})
    on_bad_image: Literal["error", "skip"] = field(
        default="error", metadata={"help": "Unreadable image: fail the run (error) or drop the sample (skip)."}
    )
    assistant_only_loss: bool = field(default=True, metadata={"help": "Loss on assistant turns only."})
    router_aux_loss_coef: float | None = field(
        default=0.0, metadata={"help": "TRL's Mixtral-style aux loss; CuMo uses its own bzloss instead."}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: where supported)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image columns for the collator."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"`stage` must be one of {STAGES}, got {self.stage!r}.")
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        super().__post_init__()
