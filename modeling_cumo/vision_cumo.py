"""CuMo's vision side: transformers' CLIP or SigLIP vision tower with MoE MLPs, and S2 multi-scale features."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, SiglipVisionModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPPreTrainedModel
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipPreTrainedModel
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .moe_cumo import CuMoExpertsKernelDefault, CuMoSparseMLP, CuMoTopKRouter, init_moe_weights


@dataclass
class CuMoVisionOutput(BaseModelOutput):
    """`last_hidden_state` is the output of the last layer run (no post-layernorm); `router_logits` holds one
    `(images * tokens, experts)` tensor per MoE layer run, when requested."""

    router_logits: tuple[torch.Tensor, ...] | None = None


class _CuMoVisionTower(CuMoExpertsKernelDefault):
    """What CuMo adds to a transformers vision transformer (CLIP or SigLIP), written once for both: encoder MLPs that
    are top-k MoE blocks when `num_experts > 1`, co-upcycling, and a forward that runs only the first `num_layers`
    encoder layers (features from layer -2 never pay for the last layer).

    Dense layers keep the encoder's own weight names, so an ordinary CLIP or SigLIP checkpoint loads into a dense
    tower. The post-layernorm (and SigLIP's pooling head) are left out: CuMo reads features before them, and a
    parameter that never gets gradient would trouble DDP. A subclass may extend the embedding step (`embed`) and
    names how many tokens precede the patch grid (`num_prefix_tokens`: CLIP's CLS token)."""

    num_prefix_tokens = 0

    def __init__(self, config, num_experts: int = 0, num_experts_per_tok: int = 2):
        super().__init__(config)
        if num_experts > 1:
            for layer in self.encoder.layers:
                layer.mlp = self._sparse_mlp(num_experts, num_experts_per_tok)
        del self.post_layernorm
        if hasattr(self, "head"):
            del self.head

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch (and class) embeddings, up to the input of the first encoder layer."""
        return self.embeddings(pixel_values)

    def _sparse_mlp(self, num_experts: int, num_experts_per_tok: int) -> CuMoSparseMLP:
        c = self.config
        return CuMoSparseMLP(c, c.hidden_size, c.intermediate_size, c.hidden_size, c.hidden_act, num_experts,
                             num_experts_per_tok)

    @property
    def router_init_std(self) -> float:
        """Std of fresh routers and experts: the encoder's `initializer_range` (SigLIP's config has none: 0.02)."""
        return getattr(self.config, "initializer_range", 0.02)

    def _init_weights(self, module):
        super()._init_weights(module)
        init_moe_weights(module, self.router_init_std)

    @torch.no_grad()
    def upcycle(self, num_experts: int, num_experts_per_tok: int) -> None:
        """Replace every dense MLP (`fc1` -> act -> `fc2`) by an MoE block whose experts are copies of it."""
        for layer in self.encoder.layers:
            dense = layer.mlp
            if not isinstance(dense, CuMoSparseMLP):
                sparse = self._sparse_mlp(num_experts, num_experts_per_tok).to(dense.fc1.weight.device, dense.fc1.weight.dtype)
                layer.mlp = sparse.co_upcycle_(dense.fc1, dense.fc2, self.router_init_std)

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None, route_only_last: bool = False,
                **kwargs) -> CuMoVisionOutput:
        """Runs the first `num_layers` layers. With `route_only_last`, the last of them only routes (its output is
        not wanted, its routing is: bzloss counts every layer) and `last_hidden_state` is the input of that layer.
        `kwargs` are the `output_hidden_states` / `output_router_logits` switches read by `capture_outputs`."""
        hidden_states = self.embed(pixel_values)
        layers = self.encoder.layers[:num_layers]
        for layer in layers[:-1] if route_only_last else layers:
            hidden_states = layer(hidden_states, None)
        if route_only_last:
            route_without_experts(layers[-1], hidden_states)
        return CuMoVisionOutput(last_hidden_state=hidden_states)


_ROUTER_LOGITS = OutputRecorder(CuMoTopKRouter, index=0)  # what `output_router_logits` records


class CuMoVisionModel(_CuMoVisionTower, CLIPVisionModel):
    """CLIP vision tower with MoE MLPs (see `_CuMoVisionTower`); its CLS token precedes the patch grid."""

    num_prefix_tokens = 1
    _can_record_outputs = {**CLIPPreTrainedModel._can_record_outputs, "router_logits": _ROUTER_LOGITS}

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixel_values))


class CuMoSiglipVisionModel(_CuMoVisionTower, SiglipVisionModel):
    """SigLIP vision tower with MoE MLPs (see `_CuMoVisionTower`): no CLS token, no pre-layernorm, no pooling head."""

    _can_record_outputs = {**SiglipPreTrainedModel._can_record_outputs, "router_logits": _ROUTER_LOGITS}


# CuMo's tower class for each vision config's `model_type` (CuMoConfig accepts only these)
VISION_TOWERS = {"clip_vision_model": CuMoVisionModel, "siglip_vision_model": CuMoSiglipVisionModel}


def route_without_experts(layer: CLIPEncoderLayer | SiglipEncoderLayer, hidden_states: torch.Tensor) -> None:
    """The part of an encoder layer that its MoE router sees (attention block, then `layer_norm2`), then the router:
    the layer's routing without the cost of its experts."""
    attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states), attention_mask=None)
    router_input = layer.layer_norm2(hidden_states + attended)
    layer.mlp.gate(router_input.reshape(-1, router_input.shape[-1]))


def s2_crops(pixel_values: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """All tower inputs of all S2 scales in one batch: scale 1 first, then for each scale s the s*s crops of the
    bicubically enlarged images, crop-major (index `(row * s + col) * num_images + image`)."""
    size = pixel_values.shape[-1]
    batches = []
    for scale in scales:
        if scale == 1:
            batches.append(pixel_values)
            continue
        big = F.interpolate(pixel_values, size=(size * scale, size * scale), mode="bicubic", align_corners=False)
        batches.extend(big[..., row * size : (row + 1) * size, col * size : (col + 1) * size]
                       for row in range(scale) for col in range(scale))
    return torch.cat(batches, dim=0)


def s2_merge(features: torch.Tensor, scales: list[int], num_images: int) -> torch.Tensor:
    """Inverse of `s2_crops` on patch features `(crops, grid * grid, C)`: stitch each scale's crops back together,
    area-pool them to the base grid, and concatenate the scales on channels -> `(images, grid * grid, C * scales)`."""
    grid = int(features.shape[1] ** 0.5)
    channels = features.shape[-1]
    merged, start = [], 0
    for scale in scales:
        count = scale * scale * num_images
        crops = features[start : start + count].transpose(1, 2).reshape(scale, scale, num_images, channels, grid, grid)
        start += count
        # (row, col, image, C, h, w) -> (image, C, row, h, col, w) -> (image, C, row * h, col * w)
        stitched = crops.permute(2, 3, 0, 4, 1, 5).reshape(num_images, channels, scale * grid, scale * grid)
        if scale > 1:
            stitched = F.interpolate(stitched, size=(grid, grid), mode="area")
        merged.append(stitched.flatten(2).transpose(1, 2))
    return torch.cat(merged, dim=-1)
