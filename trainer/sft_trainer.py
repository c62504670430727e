"""`CuMoSFTTrainer`: TRL's `SFTTrainer` that knows the paper's three stages and adds CuMo's bzloss.

TRL computes the LM loss itself (a fused, chunked LM head over the backbone's last hidden state), so the model's own
loss never reaches it, nor do the labels. The trainer therefore asks the backbone for the MoE losses (as labels would,
in training and evaluation alike), reads them from its output (a forward hook on the `CuMoModel`) and adds them in
`compute_loss`, whatever path TRL took.
"""

import logging

from transformers import set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from trl import SFTTrainer

from modeling_cumo import CuMoForConditionalGeneration, CuMoProcessor
from modeling_cumo.modeling_cumo import ROUTER_LOSS_FIELDS
from modeling_cumo.moe_cumo import CuMoSparseMLP
from modeling_cumo.processing_cumo import PLAIN_CHAT_TEMPLATE

from .config import CuMoSFTConfig
from .data import CuMoDataCollator


logger = logging.getLogger(__name__)


def cumo_model(model) -> CuMoForConditionalGeneration:
    """The CuMo model itself, also under a PEFT wrapper; anything else is refused with what to do instead."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(model, CuMoForConditionalGeneration):
        raise TypeError(f"CuMoSFTTrainer trains this package's CuMoForConditionalGeneration, got "
                        f"{type(model).__module__}.{type(model).__name__}. Load checkpoints with "
                        "CuMoForConditionalGeneration.from_pretrained(folder) or the Auto classes without "
                        "trust_remote_code (importing modeling_cumo registers them).")
    return model


def register_moe_leaf_modules(model) -> list[type]:
    """Under DeepSpeed ZeRO-3, make the sparse MoE blocks leaf modules (their parameters are gathered as a whole):
    ranks route tokens to different experts, and ZeRO-3's per-submodule prefetching otherwise hangs."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(m) for m in model.modules() if isinstance(m, (CuMoSparseMLP, MixtralSparseMoeBlock))})
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


def prepare_stage(model, args: CuMoSFTConfig) -> None:
    """Freeze or upcycle `model` in place for `args.stage` (paper, Table 6)."""
    model = cumo_model(model)
    config = model.config
    is_moe = config.vision_is_moe or config.projector_is_moe
    if args.stage in ("pt", "pft") and is_moe:
        raise ValueError(f"Stage {args.stage!r} trains a dense CuMo (the paper co-upcycles in 'vit'); this model "
                         "already has MoE blocks. Use stage 'vit' to fine-tune an MoE CuMo.")
    if args.stage == "pt":
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
    elif args.stage == "vit" and (args.upcycle_vision or args.upcycle_projector) and not is_moe:
        set_seed(args.seed)  # the fresh routers are drawn here, before the Trainer seeds: the run's seed decides them
        model.upcycle(args.upcycle_num_experts, args.upcycle_num_experts_per_tok, vision=args.upcycle_vision,
                      projector=args.upcycle_projector, experts_init=args.upcycle_experts_init)
        logger.info("Upcycled the dense blocks into top-%d-of-%d MoE blocks (experts: %s).",
                    args.upcycle_num_experts_per_tok, args.upcycle_num_experts, args.upcycle_experts_init)
    for name in ("balance_loss_coef", "router_z_loss_coef"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    model.freeze_parameters_without_gradient()
    if is_deepspeed_zero3_enabled():
        register_moe_leaf_modules(model)


class CuMoSFTTrainer(SFTTrainer):
    """Use exactly like `SFTTrainer`: `CuMoSFTTrainer(model=..., args=CuMoSFTConfig(stage="vit", ...),
    train_dataset=..., processing_class=processor).train()`.

    `model` may be a CuMo model or a path / Hub id (loaded with this package's classes). Datasets are TRL's `messages` +
    `images` format, or `trainer.data.load_llava_json(...)`. The bzloss terms are logged under the model's output
    names (`vision_balance_loss`, `projector_router_z_loss`, ...)."""

    def __init__(self, model, args: CuMoSFTConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, **kwargs):
        if not isinstance(args, CuMoSFTConfig):
            raise TypeError("CuMoSFTTrainer needs a CuMoSFTConfig (it carries the training stage).")
        if isinstance(model, str):
            model = CuMoForConditionalGeneration.from_pretrained(model, **(args.model_init_kwargs or {}))
            processing_class = processing_class or CuMoProcessor.from_pretrained(model.name_or_path)
        prepare_stage(model, args)
        if data_collator is None and processing_class is not None:
            data_collator = CuMoDataCollator(
                processor=processing_class, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of,
                assistant_only_loss=args.assistant_only_loss, image_token_id=model.config.image_token_id,
                chat_template=PLAIN_CHAT_TEMPLATE if args.stage == "pt" else None, on_bad_image=args.on_bad_image,
            )
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        self._backbone_outputs = []
        cumo_model(self.model).model.register_forward_hook(self._keep_backbone_output)

    def _keep_backbone_output(self, module, args, output):
        if output.aux_loss is not None:
            self._backbone_outputs.append(output)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._backbone_outputs.clear()
        inputs["compute_router_losses"] = True
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
