"""`CuMoSFTTrainer`: TRL's `SFTTrainer` that knows the paper's three stages and adds CuMo's bzloss.

TRL computes the LM loss itself (a fused, chunked LM head over the backbone's last hidden state), so the model's own
loss never reaches it. The trainer therefore reads the MoE losses from the backbone's output (a forward hook on the
`CuMoModel`, which returns them in training mode) and adds them in `compute_loss`, whatever path TRL took.
"""

import inspect
import logging

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import SFTTrainer

from modeling_cumo.modeling_cumo import ROUTER_LOSS_FIELDS
from modeling_cumo.processing_cumo import PLAIN_CHAT_TEMPLATE

from .config import CuMoSFTConfig
from .data import CuMoDataCollator


logger = logging.getLogger(__name__)


class _ReachableFrom(torch.autograd.Function):
    """Identity on `hidden`, with `aux` as an extra input whose gradient is None: the aux loss becomes visible from
    the model's output (DDP's unused-parameter search walks the graph from there) without changing any gradient."""

    @staticmethod
    def forward(ctx, hidden, aux):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def find_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The `CuMoModel` inside `model`, whatever wraps it (PEFT, DDP) and wherever its class was loaded from."""
    for module in model.modules():
        if type(module).__name__ == "CuMoModel":
            return module
    raise TypeError(f"{type(model).__name__} holds no CuMoModel: CuMoSFTTrainer trains CuMo models.")


def freeze_parameters_without_gradient(backbone) -> None:
    """Freeze the vision parameters no loss reaches, so that data-parallel training needs no unused-parameter search
    (which activation checkpointing breaks): a dense tower never runs the layers past its feature layer; an MoE tower
    runs the last layer for its routers' losses only, so that layer's experts get no gradient (as in the original)."""
    layers = backbone.vision_tower.encoder.layers
    num_feature_layers = backbone.config.num_feature_layers
    if num_feature_layers == len(layers):
        return
    if backbone.vision_tower.is_moe:
        layers[-1].mlp.experts.requires_grad_(False)
    else:
        for layer in layers[num_feature_layers:]:
            layer.requires_grad_(False)


MOE_BLOCK_CLASS_NAMES = ("CuMoSparseMLP", "CuMoMultiModalProjector", "MixtralSparseMoeBlock")


def register_moe_leaf_modules(model) -> list[type]:
    """Under DeepSpeed ZeRO-3, make the sparse MoE blocks leaf modules (their parameters are gathered as a whole):
    ranks route tokens to different experts, and ZeRO-3's per-submodule prefetching otherwise hangs."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(m) for m in model.modules() if type(m).__name__ in MOE_BLOCK_CLASS_NAMES})
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


def prepare_stage(model, args: CuMoSFTConfig) -> None:
    """Freeze or upcycle `model` in place for `args.stage` (paper, Table 6)."""
    backbone = find_backbone(model)
    is_moe = backbone.vision_tower.is_moe or backbone.multi_modal_projector.is_moe
    if args.stage in ("pt", "pft") and is_moe:
        raise ValueError(
            f"Stage {args.stage!r} trains a dense CuMo (the paper co-upcycles in 'vit'); this model already has MoE "
            "blocks. Use stage 'vit' to fine-tune an MoE CuMo."
        )
    if args.stage == "pt":
        model.requires_grad_(False)
        backbone.multi_modal_projector.requires_grad_(True)
    elif args.stage == "vit" and (args.upcycle_vision or args.upcycle_projector) and not is_moe:
        options = {}
        if args.upcycle_experts_init != "copy":
            # A checkpoint runs the model code saved with it, which may predate this option
            if "experts_init" not in inspect.signature(model.upcycle).parameters:
                raise ValueError(
                    "upcycle_experts_init='random' needs a checkpoint saved with CuMo-HF's current model code; this "
                    "one's code predates it. Copy modeling_cumo/*.py into the checkpoint folder, or re-save it with "
                    "this project's class: modeling_cumo.CuMoForConditionalGeneration.from_pretrained(folder)"
                    ".save_pretrained(new_folder)."
                )
            options["experts_init"] = args.upcycle_experts_init
        model.upcycle(
            num_experts=args.upcycle_num_experts,
            num_experts_per_tok=args.upcycle_num_experts_per_tok,
            vision=args.upcycle_vision,
            projector=args.upcycle_projector,
            **options,
        )
        logger.info("Upcycled the dense blocks into top-%d-of-%d MoE blocks (experts: %s).",
                    args.upcycle_num_experts_per_tok, args.upcycle_num_experts, args.upcycle_experts_init)
    for name in ("balance_loss_coef", "router_z_loss_coef"):
        if getattr(args, name) is not None:
            setattr(backbone.config, name, getattr(args, name))
    freeze_parameters_without_gradient(backbone)
    if is_deepspeed_zero3_enabled():
        register_moe_leaf_modules(model)


class CuMoSFTTrainer(SFTTrainer):
    """Use exactly like `SFTTrainer`: `CuMoSFTTrainer(model=..., args=CuMoSFTConfig(stage="vit", ...),
    train_dataset=..., processing_class=processor).train()`.

    `model` may be a CuMo model or a path / Hub id (loaded with remote code). Datasets are TRL's `messages` +
    `images` format, or `trainer.data.load_llava_json(...)`. The bzloss terms are logged under the model's output
    names (`vision_balance_loss`, `projector_router_z_loss`, ...).
    """

    def __init__(self, model, args: CuMoSFTConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, **kwargs):
        if not isinstance(args, CuMoSFTConfig):
            raise TypeError("CuMoSFTTrainer needs a CuMoSFTConfig (it carries the training stage).")
        if isinstance(model, str):
            model = AutoModelForImageTextToText.from_pretrained(
                model, trust_remote_code=True, **(args.model_init_kwargs or {})
            )
            processing_class = processing_class or AutoProcessor.from_pretrained(
                model.name_or_path, trust_remote_code=True
            )
        prepare_stage(model, args)
        if data_collator is None and processing_class is not None:
            data_collator = CuMoDataCollator(
                processor=processing_class,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
                assistant_only_loss=args.assistant_only_loss,
                chat_template=PLAIN_CHAT_TEMPLATE if args.stage == "pt" else None,
                image_token_id=model.config.image_token_id,
                on_bad_image=args.on_bad_image,
            )
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        self._backbone_outputs = []
        find_backbone(self.model).register_forward_hook(self._keep_backbone_output)

    def _keep_backbone_output(self, module, args, output):
        if getattr(output, "aux_loss", None) is not None:
            self._backbone_outputs.append(output)
            if output.aux_loss.requires_grad:
                # Routers whose only path to the loss is the aux loss (the last CLIP layer's) would otherwise look
                # unused to DDP at the end of the forward, and then receive a gradient
                output.last_hidden_state = _ReachableFrom.apply(output.last_hidden_state, output.aux_loss)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._backbone_outputs.clear()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        # The first backbone call is the one the loss differentiates (later ones only feed metrics, without grad)
        backbone_output = self._backbone_outputs[0] if self._backbone_outputs else None
        self._backbone_outputs.clear()
        if backbone_output is not None:
            # A per-micro-batch mean, like TRL's own aux loss: spread over the accumulation steps when the LM loss is
            # normalised by the tokens of the whole accumulated batch
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + backbone_output.aux_loss.to(loss.device) / steps
            mode = "train" if self.model.training else "eval"
            for name in ("aux_loss", *ROUTER_LOSS_FIELDS):
                value = getattr(backbone_output, name)
                if value is not None:
                    self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss
