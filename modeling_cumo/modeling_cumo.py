"""CuMo: CLIP or SigLIP (with MoE MLPs) -> S2 multi-scale features -> (MoE) projector -> any causal LM, LLaVA style."""

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
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers before 5.21: the last `logits_to_keep` positions (0: all), or the given ones
    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        return hidden_states[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep, :]

from .configuration_cumo import CuMoConfig
from .moe_cumo import (CuMoExperts, CuMoExpertsKernelDefault, CuMoSparseMLP, count_inactive_expert_parameters,
                        init_moe_weights, moe_losses)
from .vision_cumo import VISION_TOWERS, s2_crops, s2_merge


@cache
def _field_names(output_class: type) -> frozenset[str]:
    return frozenset(field.name for field in fields(output_class))


class _CachedFieldsOutput:
    """ModelOutput's `__setattr__` lists the dataclass fields on every assignment: an output costs the square of its
    field count (ours: 13) on every decode step. Same behaviour, with the field names computed once per class."""

    def __setattr__(self, name, value):
        if value is not None and name in _field_names(type(self)):
            OrderedDict.__setitem__(self, name, value)
        OrderedDict.__setattr__(self, name, value)


@dataclass
class _VisionLosses(_CachedFieldsOutput):
    """Raw bzloss terms (without coefficients) of the vision tower's and the projector's MoE blocks, when computed."""

    vision_balance_loss: torch.Tensor | None = None
    vision_router_z_loss: torch.Tensor | None = None
    projector_balance_loss: torch.Tensor | None = None
    projector_router_z_loss: torch.Tensor | None = None


@dataclass
class _CuMoLosses(_VisionLosses):
    """The same terms of an MoE language model, the projected image features (`CuMoImageFeaturesOutput.pooler_output`)
    and `aux_loss`: `balance_loss_coef * sum(balance losses) + router_z_loss_coef * sum(z-losses)`, when computed."""

    text_balance_loss: torch.Tensor | None = None
    text_router_z_loss: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class CuMoImageFeaturesOutput(_VisionLosses, BaseModelOutputWithPooling):
    """last_hidden_state (`(num_images, num_patches, vision_hidden * len(scales))`): S2 features of the vision tower.
    pooler_output (`(num_images, num_patches, text_hidden)`): the projected features that replace the image tokens."""


@dataclass
class CuMoModelOutputWithPast(_CuMoLosses, BaseModelOutputWithPast):
    """The language model's outputs, the projected image features and the MoE losses (see `_CuMoLosses`)."""


@dataclass
class CuMoCausalLMOutputWithPast(_CuMoLosses, CausalLMOutputWithPast):
    """`loss`: cross-entropy (with `labels`) plus `aux_loss` (when the MoE losses were computed: in training or with
    labels). Other fields as in `CuMoModelOutputWithPast`."""


ROUTER_LOSS_FIELDS = tuple(field.name for field in fields(_CuMoLosses) if field.name.endswith(("balance_loss", "z_loss")))


class CuMoMultiModalProjector(nn.Module):
    """The dense projector, Linear -> GELU -> Linear from S2 features to the LM width, with LLaVA's weight names."""

    def __init__(self, config: CuMoConfig):
        super().__init__()
        in_features, out_features = config.vision_config.hidden_size * len(config.scales), config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def make_projector(config: CuMoConfig) -> CuMoMultiModalProjector | CuMoSparseMLP:
    """The projector `config` asks for: dense, or a top-k MoE of such MLPs (eager experts: it changes the width)."""
    if not config.projector_is_moe:
        return CuMoMultiModalProjector(config)
    in_features, out_features = config.vision_config.hidden_size * len(config.scales), config.text_config.hidden_size
    return CuMoSparseMLP(config, in_features, out_features, out_features, config.projector_hidden_act,
                         config.projector_num_experts, config.projector_num_experts_per_tok, experts_class=CuMoExperts)


class _ReachableFrom(torch.autograd.Function):
    """Identity on `hidden`, with `aux` as an extra input whose gradient is None: DDP's unused-parameter search, which
    walks the graph from a forward's outputs, then sees the aux loss, and no gradient changes."""

    @staticmethod
    def forward(ctx, hidden, aux):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class CuMoTokenEmbedding(nn.Embedding):
    """The language model's token embedding, where an id outside the table (the `<image>` placeholder of converted
    checkpoints) reads row 0: image features replace those positions afterwards. vLLM's Transformers backend embeds
    whole prompts, placeholders included, through this module before it merges the image features."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < 0) | (input_ids >= self.num_embeddings)
        return super().forward(input_ids.masked_fill(outside, 0))


class CuMoPreTrainedModel(CuMoExpertsKernelDefault, PreTrainedModel):
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
        tower_class = VISION_TOWERS[config.vision_config.model_type]  # the config checked the model type
        self.vision_tower = tower_class(config.vision_config, experts, config.vision_num_experts_per_tok)
        self.multi_modal_projector = make_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        embeddings = self.language_model.get_input_embeddings()
        if type(embeddings) is nn.Embedding:
            self.language_model.set_input_embeddings(
                CuMoTokenEmbedding(embeddings.num_embeddings, embeddings.embedding_dim, embeddings.padding_idx)
            )
        self.post_init()

    @property
    def language_model_is_moe(self) -> bool:
        return "router_logits" in (getattr(self.language_model, "_can_record_outputs", None) or {})

    @torch.no_grad()
    def upcycle(self, num_experts: int = 4, num_experts_per_tok: int = 2, vision: bool = True, projector: bool = True,
                experts_init: str = "copy"):
        """Co-upcycle the dense blocks asked for (see `CuMoForConditionalGeneration.upcycle`)."""
        if experts_init not in ("copy", "random"):
            raise ValueError(f"`experts_init` must be 'copy' or 'random', got {experts_init!r}.")
        if num_experts < 2 or not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"Upcycling needs num_experts >= 2 and 1 <= num_experts_per_tok <= num_experts, "
                             f"got {num_experts} and {num_experts_per_tok}.")
        config = self.config
        vision = vision and not config.vision_is_moe
        projector = projector and not config.projector_is_moe
        if not (vision or projector):
            raise ValueError("Nothing to upcycle: the requested blocks are already MoE.")
        if vision:
            config.vision_num_experts, config.vision_num_experts_per_tok = num_experts, num_experts_per_tok
            self.vision_tower.upcycle(num_experts, num_experts_per_tok)
        if projector:
            config.projector_num_experts, config.projector_num_experts_per_tok = num_experts, num_experts_per_tok
            dense = self.multi_modal_projector
            sparse = make_projector(config).to(dense.linear_1.weight.device, dense.linear_1.weight.dtype)
            std = config.text_config.initializer_range
            self.multi_modal_projector = sparse.co_upcycle_(dense.linear_1, dense.linear_2, std)
        if experts_init == "random":
            for blocks, std, upcycled in ((self.vision_tower, self.vision_tower.router_init_std, vision),
                                          (self.multi_modal_projector, config.text_config.initializer_range, projector)):
                if upcycled:
                    blocks.apply(lambda module: init_moe_weights(module, std))

    def get_image_features(self, pixel_values: torch.Tensor, compute_router_losses: bool = False,
                           **kwargs) -> CuMoImageFeaturesOutput:
        """S2 features of the vision tower (all crops of all scales in one tower call), then the projector.

        The tower runs up to the feature layer only. When the MoE losses are wanted, the routers of the later layers
        count too, as in the original: the layers between run, and the last one only routes (its experts' output
        would be thrown away)."""
        config = self.config
        size = config.vision_config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"`pixel_values` must have shape (num_images, 3, {size}, {size}), got "
                             f"{tuple(pixel_values.shape)}. Use the model's processor.")
        num_images = pixel_values.shape[0]
        vision_losses = compute_router_losses and config.vision_is_moe
        projector_losses = compute_router_losses and config.projector_is_moe
        num_feature_layers = config.num_feature_layers
        num_layers = config.vision_config.num_hidden_layers if vision_losses else num_feature_layers
        route_only_last = num_layers != num_feature_layers
        # the tower's last_hidden_state is the feature layer's output unless layers run beyond the one routed only
        features_inside = route_only_last and num_layers - 1 != num_feature_layers
        crops = s2_crops(pixel_values.to(self.vision_tower.dtype), config.scales)
        tower = self.vision_tower(crops, num_layers=num_layers, route_only_last=route_only_last,
                                  output_hidden_states=features_inside, output_router_logits=vision_losses)
        hidden = tower.hidden_states[num_feature_layers] if features_inside else tower.last_hidden_state
        # CLIP's CLS token dropped; SigLIP has none
        vision_features = s2_merge(hidden[:, self.vision_tower.num_prefix_tokens :], config.scales, num_images)
        if projector_losses:
            projected, projector_logits = self.multi_modal_projector(vision_features, output_router_logits=True)
        else:
            projected = self.multi_modal_projector(vision_features)

        output = CuMoImageFeaturesOutput(last_hidden_state=vision_features, pooler_output=projected)
        if vision_losses:  # per crop, averaged over each scale's crops, over layers, then over scales
            crops_per_scale = [scale * scale * num_images for scale in config.scales]
            output.vision_balance_loss, output.vision_router_z_loss = moe_losses(tower.router_logits, crops_per_scale)
        if projector_losses:  # per image
            output.projector_balance_loss, output.projector_router_z_loss = moe_losses((projector_logits,), [num_images])
        return output

    def parameters_without_gradient(self) -> list[nn.Parameter]:
        """The vision parameters no loss reaches: a dense tower never runs the layers past its feature layer; an MoE
        tower runs the last layer for its routers' losses only, so that layer's experts get none (as in the original)."""
        layers = self.vision_tower.encoder.layers
        num_feature_layers = self.config.num_feature_layers
        if num_feature_layers == len(layers):
            return []
        if self.config.vision_is_moe:
            return list(layers[-1].mlp.experts.parameters())
        return [p for layer in layers[num_feature_layers:] for p in layer.parameters()]

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
            raise ValueError(f"The prompts hold {num_tokens} image tokens but {features.shape[0]} image(s) give "
                             f"{features.shape[0]} x {features.shape[1]} features: pass one image per `<image>` "
                             "placeholder and let the processor expand each placeholder.")

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                mm_encoder_outputs: dict[str, CuMoImageFeaturesOutput] | None = None,
                compute_router_losses: bool | None = None, **kwargs) -> CuMoModelOutputWithPast:
        r"""
        mm_encoder_outputs (`dict`, *optional*): `{"image": model.get_image_features(pixel_values)}` computed
            beforehand, e.g. once per chat conversation, instead of `pixel_values`.
        compute_router_losses (`bool`, *optional*): compute the MoE losses. The rule: whenever a loss is computed, so by
            default in training mode, and with `labels` (`CuMoForConditionalGeneration`); a caller that computes the
            loss itself without training mode asks with `True` (CuMoSFTTrainer does: TRL's fused LM head keeps the
            labels from this model).
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
        outputs = self.language_model(attention_mask=attention_mask, position_ids=position_ids,
                                      past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)

        losses = {name: getattr(image_outputs, name, None) for name in ROUTER_LOSS_FIELDS[:4]}
        if text_losses:
            # One "sample" of all the batch's tokens, averaged over layers. Unlike the original, padding is left
            # out, as transformers' Mixtral does.
            text_logits = outputs.router_logits
            if attention_mask is not None and attention_mask.ndim == 2:
                real = attention_mask[:, -inputs_embeds.shape[1] :].reshape(-1).bool()
                text_logits = [logits[real.to(logits.device)] for logits in text_logits]
            losses["text_balance_loss"], losses["text_router_z_loss"] = moe_losses(text_logits, [1])
        aux_loss = self._aux_loss(losses) if compute_router_losses else None
        last_hidden_state = outputs.last_hidden_state
        if aux_loss is not None and aux_loss.requires_grad:
            # A caller may add the aux loss outside this forward (TRL's fused LM head): the routers only it reaches
            # (the last CLIP layer's) would then look unused to DDP at the end of the forward, then get a gradient
            last_hidden_state = _ReachableFrom.apply(last_hidden_state, aux_loss)
        return CuMoModelOutputWithPast(
            last_hidden_state=last_hidden_state, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, image_hidden_states=image_features,
            aux_loss=aux_loss, **losses,
        )

    def _aux_loss(self, losses: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
        terms = [(self.config.balance_loss_coef if name.endswith("balance_loss") else self.config.router_z_loss_coef)
                 * value for name, value in losses.items() if value is not None]
        return torch.stack(terms).sum() if terms else None


class CuMoForConditionalGeneration(CuMoPreTrainedModel, GenerationMixin):
    """CuMo with its LM head: `generate()`, batching, left padding, KV cache and streamers work as for LLaVA."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CuMoConfig):
        super().__init__(config)
        self.model = CuMoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> CuMoImageFeaturesOutput:
        return self.model.get_image_features(pixel_values, **kwargs)

    def upcycle(self, num_experts: int = 4, num_experts_per_tok: int = 2, vision: bool = True, projector: bool = True,
                experts_init: str = "copy"):
        """Co-upcycling (paper §3.2): the dense CLIP MLPs and projector become top-k MoE blocks whose experts are
        copies of the dense weights, with fresh routers. Outputs are unchanged right after. `experts_init="random"`
        initialises the experts afresh instead (the paper's MoE trained from scratch, Table 3a). Returns `self`."""
        self.model.upcycle(num_experts, num_experts_per_tok, vision, projector, experts_init)
        return self

    def freeze_parameters_without_gradient(self) -> None:
        """Freeze what no loss reaches (`CuMoModel.parameters_without_gradient`), so that data-parallel training
        needs no unused-parameter search for them (activation checkpointing breaks that search)."""
        for parameter in self.model.parameters_without_gradient():
            parameter.requires_grad_(False)

    def num_activated_parameters(self) -> int:
        """Parameters one token uses: all of them minus the experts it is not routed to (paper, Table 7)."""
        return self.num_parameters() - count_inactive_expert_parameters(self)

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                mm_encoder_outputs: dict[str, CuMoImageFeaturesOutput] | None = None,
                compute_router_losses: bool | None = None, **kwargs) -> CuMoCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, sequence)`, *optional*): next-token targets, -100 to ignore;
            image placeholder positions are always ignored.
        compute_router_losses (`bool`, *optional*): compute the MoE losses (default: in training mode or with `labels`,
            the rule of `CuMoModel.forward`).
        """
        if compute_router_losses is None and labels is not None:
            compute_router_losses = True
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs,
            compute_router_losses=compute_router_losses, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            if input_ids is not None:  # image positions predict nothing (and their id may be outside the vocabulary)
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            vocab_size = self.config.text_config.vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        if outputs.aux_loss is not None:
            loss = outputs.aux_loss if loss is None else loss + outputs.aux_loss

        return CuMoCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_hidden_states=outputs.image_hidden_states, aux_loss=outputs.aux_loss,
            **{name: getattr(outputs, name) for name in ROUTER_LOSS_FIELDS},
        )


# generate() inspects the forward signature of every remote-code model at every decode step (transformers 5.x,
# `prepare_inputs_for_generation`); a precomputed signature makes that lookup free.
CuMoForConditionalGeneration.forward.__signature__ = inspect.signature(CuMoForConditionalGeneration.forward)
CuMoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CuMoForConditionalGeneration", "CuMoModel", "CuMoPreTrainedModel", "CuMoMultiModalProjector"]
