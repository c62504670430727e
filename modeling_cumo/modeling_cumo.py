"""CuMo: CLIP (with MoE MLPs) -> S2 multi-scale features -> (MoE) projector -> any causal LM, LLaVA style."""

import inspect
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import cache

import torch
from torch import nn
from transformers import AutoModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import PreTrainedModel


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers before 5.21

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The last `logits_to_keep` positions (0: all), or the given positions (as LLaVA slices them)."""
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, kept, :]

from .configuration_cumo import CuMoConfig
from .moe_cumo import (
    CuMoExperts,
    CuMoTopKRouter,
    co_upcycle_,
    count_inactive_expert_parameters,
    init_moe_weights,
    router_losses,
)
from .vision_cumo import CuMoVisionModel, s2_crops, s2_merge


@cache
def _field_names(output_class: type) -> frozenset[str]:
    return frozenset(field.name for field in fields(output_class))


class _CachedFieldsOutput:
    """ModelOutput's `__setattr__` lists the dataclass fields on every assignment, so building an output costs the
    square of its field count; ours carry the router-loss terms too (13 fields), which made each decode step ~5%
    slower than the bare LM's. Same behaviour, with the field names computed once per class."""

    def __setattr__(self, name, value):
        if value is not None and name in _field_names(type(self)):
            OrderedDict.__setitem__(self, name, value)
        OrderedDict.__setattr__(self, name, value)


@dataclass
class CuMoImageFeaturesOutput(_CachedFieldsOutput, BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`(num_images, num_patches, vision_hidden * len(scales))`): S2 features of the vision tower.
    pooler_output (`(num_images, num_patches, text_hidden)`): the projected features that replace the image tokens.
    vision_balance_loss, vision_router_z_loss, projector_balance_loss, projector_router_z_loss: raw bzloss terms
        (without coefficients) of the MoE blocks, when they were computed.
    """

    vision_balance_loss: torch.Tensor | None = None
    vision_router_z_loss: torch.Tensor | None = None
    projector_balance_loss: torch.Tensor | None = None
    projector_router_z_loss: torch.Tensor | None = None


@dataclass
class CuMoModelOutputWithPast(_CachedFieldsOutput, BaseModelOutputWithPast):
    r"""
    image_hidden_states: the projected image features (see `CuMoImageFeaturesOutput.pooler_output`).
    aux_loss: `balance_loss_coef * sum(balance losses) + router_z_loss_coef * sum(z-losses)`, when computed.
    vision_*, projector_*, text_*: the raw loss terms of each MoE module (`text_*` only for an MoE language model).
    """

    image_hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    vision_balance_loss: torch.Tensor | None = None
    vision_router_z_loss: torch.Tensor | None = None
    projector_balance_loss: torch.Tensor | None = None
    projector_router_z_loss: torch.Tensor | None = None
    text_balance_loss: torch.Tensor | None = None
    text_router_z_loss: torch.Tensor | None = None


@dataclass
class CuMoCausalLMOutputWithPast(_CachedFieldsOutput, ModelOutput):
    r"""
    loss: cross-entropy (with `labels`) plus `aux_loss` (when the MoE losses were computed: with labels or in training).
    Other fields as in `CuMoModelOutputWithPast`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    vision_balance_loss: torch.Tensor | None = None
    vision_router_z_loss: torch.Tensor | None = None
    projector_balance_loss: torch.Tensor | None = None
    projector_router_z_loss: torch.Tensor | None = None
    text_balance_loss: torch.Tensor | None = None
    text_router_z_loss: torch.Tensor | None = None


ROUTER_LOSS_FIELDS = (
    "vision_balance_loss",
    "vision_router_z_loss",
    "projector_balance_loss",
    "projector_router_z_loss",
    "text_balance_loss",
    "text_router_z_loss",
)


class CuMoMultiModalProjector(nn.Module):
    """Linear -> GELU -> Linear from S2 features to the LM width: dense (LLaVA's weight names) or a top-k MoE of
    such MLPs. Returns the projected features and, for the MoE, the router logits `(images, patches, experts)`."""

    def __init__(self, config: CuMoConfig):
        super().__init__()
        self.in_features = config.vision_config.hidden_size * len(config.scales)
        self.out_features = config.text_config.hidden_size
        self.hidden_act = config.projector_hidden_act
        if config.projector_is_moe:
            self._make_sparse(config, config.projector_num_experts, config.projector_num_experts_per_tok)
        else:
            self.linear_1 = nn.Linear(self.in_features, self.out_features)
            self.act = ACT2FN[self.hidden_act]
            self.linear_2 = nn.Linear(self.out_features, self.out_features)

    def _make_sparse(self, config, num_experts: int, num_experts_per_tok: int) -> None:
        self.gate = CuMoTopKRouter(self.in_features, num_experts, num_experts_per_tok)
        self.experts = CuMoExperts(
            config, num_experts, self.in_features, self.out_features, self.out_features, self.hidden_act
        )

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "experts")

    @torch.no_grad()
    def upcycle(self, config, num_experts: int, num_experts_per_tok: int, router_std: float) -> None:
        weight = self.linear_1.weight
        self._make_sparse(config, num_experts, num_experts_per_tok)
        self.to(weight.device, weight.dtype)
        co_upcycle_(self.gate, self.experts, self.linear_1, self.linear_2, router_std)
        del self.linear_1, self.act, self.linear_2

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.is_moe:
            return self.linear_2(self.act(self.linear_1(features))), None
        flat = features.reshape(-1, features.shape[-1])
        router_logits, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights)
        return out.reshape(*features.shape[:-1], -1), router_logits.reshape(*features.shape[:-1], -1)


class CuMoPreTrainedModel(PreTrainedModel):
    config: CuMoConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Kept in fp32 when loading in fp16, and never quantized by bitsandbytes: broken projectors are what users of
    # other MoE VLMs report otherwise. (MoE routers and experts are plain parameters, which bitsandbytes leaves alone.)
    _keep_in_fp32_modules = ["vision_tower", "multi_modal_projector"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # the vision tower's MoE MLPs (and a Mixtral LM's) use transformers' experts interface

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        if requested_experts in (None, "auto"):
            return "auto"  # CuMo's per-device default (see `per_device_experts_kernel`)
        return super().get_correct_experts_implementation(requested_experts)

    def set_experts_implementation(self, experts_implementation: str | dict):
        """As transformers' method; "auto" (the default) applies to the CLIP experts only, a Mixtral LM keeps its own."""
        if experts_implementation == "auto":
            experts_implementation = {"": "auto", "vision_config": "auto"}
        super().set_experts_implementation(experts_implementation)

    def _init_weights(self, module):
        super()._init_weights(module)
        init_moe_weights(module, self.config.text_config.initializer_range)


class CuMoModel(CuMoPreTrainedModel):
    """Vision tower, projector and language model, without LM head (as `LlavaModel`)."""

    def __init__(self, config: CuMoConfig):
        super().__init__(config)
        experts = config.vision_num_experts if config.vision_is_moe else 0
        self.vision_tower = CuMoVisionModel(config.vision_config, experts, config.vision_num_experts_per_tok)
        self.multi_modal_projector = CuMoMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def language_model_is_moe(self) -> bool:
        return "router_logits" in (getattr(self.language_model, "_can_record_outputs", None) or {})

    @torch.no_grad()
    def upcycle(self, num_experts: int = 4, num_experts_per_tok: int = 2, vision: bool = True, projector: bool = True,
                experts_init: str = "copy"):
        """Co-upcycle the dense vision MLPs and/or the dense projector into top-k MoE blocks: experts are copies of
        the dense weights (`experts_init="copy"`) or freshly initialised (`"random"`, the paper's MoE trained from
        scratch, Table 3a)."""
        if experts_init not in ("copy", "random"):
            raise ValueError(f"`experts_init` must be 'copy' or 'random', got {experts_init!r}.")
        if num_experts < 2 or not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(
                f"Upcycling needs num_experts >= 2 and 1 <= num_experts_per_tok <= num_experts, "
                f"got {num_experts} and {num_experts_per_tok}."
            )
        vision = vision and not self.vision_tower.is_moe
        projector = projector and not self.multi_modal_projector.is_moe
        if not (vision or projector):
            raise ValueError("Nothing to upcycle: the requested blocks are already MoE.")
        if vision:
            self.vision_tower.upcycle(num_experts, num_experts_per_tok)
            self.config.vision_num_experts, self.config.vision_num_experts_per_tok = num_experts, num_experts_per_tok
        if projector:
            std = self.config.text_config.initializer_range
            self.multi_modal_projector.upcycle(self.config, num_experts, num_experts_per_tok, std)
            self.config.projector_num_experts = num_experts
            self.config.projector_num_experts_per_tok = num_experts_per_tok
        if experts_init == "random":
            # Here, not in the trainer: a model loaded with remote code has its own copies of these classes.
            for blocks, std, upcycled in ((self.vision_tower, self.config.vision_config.initializer_range, vision),
                                          (self.multi_modal_projector, self.config.text_config.initializer_range, projector)):
                if upcycled:
                    blocks.apply(lambda module: init_moe_weights(module, std))

    def get_image_features(
        self, pixel_values: torch.Tensor, compute_router_losses: bool = False, **kwargs
    ) -> CuMoImageFeaturesOutput:
        """S2 features of the vision tower (all crops of all scales in one tower call), then the projector.

        The tower runs up to the feature layer only. When the MoE losses are wanted, the routers of the later layers
        count too, as in the original: the layers between run, and the last one only routes (its experts' output
        would be thrown away).
        """
        config = self.config
        vision_config = config.vision_config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, vision_config.image_size, vision_config.image_size):
            raise ValueError(
                f"`pixel_values` must have shape (num_images, 3, {vision_config.image_size}, "
                f"{vision_config.image_size}), got {tuple(pixel_values.shape)}. Use the model's processor."
            )
        num_images = pixel_values.shape[0]
        vision_losses = compute_router_losses and self.vision_tower.is_moe
        num_feature_layers = config.num_feature_layers
        num_layers = vision_config.num_hidden_layers if vision_losses else num_feature_layers

        pixel_values = pixel_values.to(self.vision_tower.dtype)
        route_only_last = num_layers != num_feature_layers
        # the tower's last_hidden_state is the feature layer's output unless layers run beyond the one routed only
        features_inside = route_only_last and num_layers - 1 != num_feature_layers
        tower = self.vision_tower(
            s2_crops(pixel_values, config.scales),
            num_layers=num_layers,
            route_only_last=route_only_last,
            output_hidden_states=features_inside,
            output_router_logits=vision_losses,
        )
        hidden = tower.hidden_states[num_feature_layers] if features_inside else tower.last_hidden_state
        vision_features = s2_merge(hidden[:, 1:], config.scales, num_images)  # CLS dropped
        projected, projector_logits = self.multi_modal_projector(vision_features)

        output = CuMoImageFeaturesOutput(last_hidden_state=vision_features, pooler_output=projected)
        if vision_losses:
            output.vision_balance_loss, output.vision_router_z_loss = self._vision_router_losses(
                tower.router_logits, num_images
            )
        if compute_router_losses and projector_logits is not None:
            balance, z = router_losses(projector_logits)
            output.projector_balance_loss, output.projector_router_z_loss = balance.mean(), z.mean()
        return output

    def _vision_router_losses(self, router_logits: tuple[torch.Tensor, ...], num_images: int):
        """Per crop and layer, then averaged over the crops of each scale, over layers, and over scales."""
        logits = torch.stack(router_logits)  # (layers, crops * tokens, experts)
        crops_per_scale = [scale * scale * num_images for scale in self.config.scales]
        num_crops = sum(crops_per_scale)
        num_layers, _, num_experts = logits.shape
        balance, z = router_losses(logits.reshape(num_layers * num_crops, -1, num_experts))
        per_scale = [
            torch.stack([part.mean(dim=1) for part in loss.view(num_layers, num_crops).split(crops_per_scale, dim=1)])
            for loss in (balance, z)
        ]  # each (scales, layers)
        return per_scale[0].mean(dim=1).mean(), per_scale[1].mean(dim=1).mean()

    def _image_token_positions(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        embeddings = self.get_input_embeddings()
        if self.config.image_token_id >= embeddings.num_embeddings:
            raise ValueError("The image token has no embedding in this model: pass `input_ids` with images.")
        image_embedding = embeddings(torch.tensor(self.config.image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embedding).all(-1)

    @staticmethod
    def _check_image_tokens(special_image_mask: torch.Tensor, features: torch.Tensor) -> None:
        num_tokens = int(special_image_mask.sum())
        if num_tokens != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"The prompts hold {num_tokens} image tokens but {features.shape[0]} image(s) give "
                f"{features.shape[0]} x {features.shape[1]} features: pass one image per `<image>` placeholder and let "
                "the processor expand each placeholder."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, CuMoImageFeaturesOutput] | None = None,
        compute_router_losses: bool | None = None,
        **kwargs,
    ) -> CuMoModelOutputWithPast:
        r"""
        mm_encoder_outputs (`dict`, *optional*): `{"image": model.get_image_features(pixel_values)}` computed
            beforehand, e.g. once per chat conversation, instead of `pixel_values`.
        compute_router_losses (`bool`, *optional*): compute the MoE losses (default: in training mode).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("Pass either `pixel_values` or `mm_encoder_outputs`, not both.")
        compute_router_losses = self.training if compute_router_losses is None else compute_router_losses
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, compute_router_losses=compute_router_losses)

        if inputs_embeds is None:
            special_image_mask = input_ids == self.config.image_token_id
            # The image token may lie outside the LM's vocabulary (converted checkpoints keep theirs): embed a
            # stand-in id; these positions are overwritten by image features.
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(special_image_mask, 0))
        elif image_outputs is not None:
            special_image_mask = self._image_token_positions(inputs_embeds)

        image_features = None
        if image_outputs is not None:
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            self._check_image_tokens(special_image_mask, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(special_image_mask.unsqueeze(-1), image_features)

        text_losses = compute_router_losses and self.language_model_is_moe
        if text_losses:
            kwargs["output_router_logits"] = True
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

        losses = {name: getattr(image_outputs, name, None) for name in ROUTER_LOSS_FIELDS[:4]}
        if text_losses:
            # One "sample" of all the batch's tokens, averaged over layers. Unlike the original, padding is left
            # out, as transformers' Mixtral does.
            text_logits = torch.stack(outputs.router_logits)  # (layers, batch * sequence, experts)
            if attention_mask is not None and attention_mask.ndim == 2:
                real = attention_mask[:, -inputs_embeds.shape[1] :].reshape(-1).bool()
                text_logits = text_logits[:, real.to(text_logits.device)]
            balance, z = router_losses(text_logits)
            losses["text_balance_loss"], losses["text_router_z_loss"] = balance.mean(), z.mean()
        return CuMoModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            aux_loss=self._aux_loss(losses) if compute_router_losses else None,
            **losses,
        )

    def _aux_loss(self, losses: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
        terms = [
            (self.config.balance_loss_coef if name.endswith("balance_loss") else self.config.router_z_loss_coef) * value
            for name, value in losses.items()
            if value is not None
        ]
        return torch.stack(terms).sum() if terms else None


class CuMoForConditionalGeneration(CuMoPreTrainedModel, GenerationMixin):
    """CuMo with its LM head: `generate()`, batching, left padding, KV cache and streamers work as for LLaVA."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CuMoConfig):
        super().__init__(config)
        self.model = CuMoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> CuMoImageFeaturesOutput:
        return self.model.get_image_features(pixel_values, **kwargs)

    def upcycle(self, num_experts: int = 4, num_experts_per_tok: int = 2, vision: bool = True, projector: bool = True,
                experts_init: str = "copy"):
        """Co-upcycling (paper §3.2): the dense CLIP MLPs and projector become top-k MoE blocks whose experts are
        copies of the dense weights, with fresh routers. Outputs are unchanged right after. `experts_init="random"`
        initialises the experts afresh instead (MoE from scratch). Returns `self`."""
        self.model.upcycle(num_experts, num_experts_per_tok, vision=vision, projector=projector,
                           experts_init=experts_init)
        return self

    def num_activated_parameters(self) -> int:
        """Parameters one token uses: all of them minus the experts it is not routed to (paper, Table 7)."""
        return self.num_parameters() - count_inactive_expert_parameters(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, CuMoImageFeaturesOutput] | None = None,
        **kwargs,
    ) -> CuMoCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, sequence)`, *optional*): next-token targets, -100 to ignore;
            image placeholder positions are always ignored.
        """
        compute_router_losses = labels is not None or self.training
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            compute_router_losses=compute_router_losses,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if input_ids is not None:  # image positions predict nothing (and their id may be outside the vocabulary)
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        if outputs.aux_loss is not None:
            loss = outputs.aux_loss if loss is None else loss + outputs.aux_loss

        return CuMoCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            aux_loss=outputs.aux_loss,
            **{name: getattr(outputs, name) for name in ROUTER_LOSS_FIELDS},
        )


# generate() inspects the forward signature of every remote-code model at every decode step (transformers 5.x,
# `prepare_inputs_for_generation`); a precomputed signature makes that lookup free instead of ~5% of a small step.
CuMoForConditionalGeneration.forward.__signature__ = inspect.signature(CuMoForConditionalGeneration.forward)
CuMoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CuMoForConditionalGeneration", "CuMoModel", "CuMoPreTrainedModel", "CuMoMultiModalProjector"]
