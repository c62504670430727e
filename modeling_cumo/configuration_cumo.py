"""Configuration of CuMo: a LLaVA-style model whose CLIP MLPs and projector may be sparse MoE blocks."""

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig


try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers before 5.20: `__post_init__` below builds the sub-configs itself
    SubConfigSpec = None


_CLIP_L_336 = {"intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14, "image_size": 336,
               "num_hidden_layers": 24, "num_attention_heads": 16, "projection_dim": 768}


# The vision encoders CuMo's tower can be (transformers' model types of their vision configs).
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


class CuMoConfig(PreTrainedConfig):
    r"""
    Configuration of a CuMo model. Defaults describe the released `CuMo-mistral-7b`: CLIP ViT-L/14-336 with S2
    scales [1, 3], top-2-of-4 MoE in every CLIP MLP and in the projector, and Mistral-7B.

    Args:
        vision_config (`dict`, `CLIPVisionConfig` or `SiglipVisionConfig`): the vision tower (CLIP by default; a dict
            names its `model_type`, `"clip_vision_model"` or `"siglip_vision_model"`).
        text_config (`dict` or `PreTrainedConfig`): any causal language model (Mistral, Mixtral, Llama, Qwen2, ...).
        image_token_id (`int`): id of the `<image>` placeholder token; each image fills as many of them as it has
            patches.
        scales (`list[int]`): S2 scales. Scale s resizes the image to s times the CLIP input size, runs the s*s
            crops through the tower and pools them back to the base grid; scales are concatenated on channels.
        vision_feature_layer (`int`): hidden state of the tower used as image features (-2: the input of the last
            layer, which is then not computed at inference).
        vision_num_experts, vision_num_experts_per_tok (`int`): experts and top-k of each CLIP MLP (0 or 1: dense).
        projector_num_experts, projector_num_experts_per_tok (`int`): the same for the projector.
        projector_hidden_act (`str`): activation between the projector's two linear layers (exact GELU in CuMo).
        balance_loss_coef, router_z_loss_coef (`float`): weights of the MoE auxiliary losses ("bzloss").
    """

    model_type = "cumo"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_L_336),
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mistral"),
        }
    else:
        sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    scales: list[int] | tuple[int, ...] = (1, 3)
    vision_feature_layer: int = -2
    vision_num_experts: int = 4
    vision_num_experts_per_tok: int = 2
    projector_num_experts: int = 4
    projector_num_experts_per_tok: int = 2
    projector_hidden_act: str = "gelu"
    balance_loss_coef: float = 0.1
    router_z_loss_coef: float = 0.01
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            self.vision_config = _sub_config(self.vision_config, "clip_vision_model", _CLIP_L_336)
            self.text_config = _sub_config(self.text_config, "mistral", {})
        super().__post_init__(**kwargs)
        self.scales = [int(s) for s in self.scales]
        if not self.scales or any(s < 1 for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"`scales` must be distinct positive integers, got {self.scales}.")
        for name in ("vision", "projector"):
            experts, top_k = getattr(self, f"{name}_num_experts"), getattr(self, f"{name}_num_experts_per_tok")
            if experts < 0 or (experts > 1 and not 1 <= top_k <= experts):
                raise ValueError(f"`{name}_num_experts_per_tok` must be between 1 and `{name}_num_experts` "
                                 f"({experts}), got {top_k}.")
        if self.vision_config.model_type not in VISION_MODEL_TYPES:
            raise ValueError(f"CuMo's vision tower is CLIP or SigLIP (`model_type` {' or '.join(VISION_MODEL_TYPES)}), "
                             f"got {self.vision_config.model_type!r}.")
        num_layers = self.vision_config.num_hidden_layers
        if not -num_layers - 1 <= self.vision_feature_layer <= num_layers:
            raise ValueError(f"`vision_feature_layer` must index one of the {num_layers + 1} hidden states of the "
                             f"vision tower, got {self.vision_feature_layer}.")
        auto_map = getattr(self, "auto_map", None) or {}
        if "AutoModel" not in auto_map:
            # AutoModel gives the generate-capable model, as remote-code VLMs on the Hub customarily do.
            self.auto_map = {**auto_map, "AutoModel": "modeling_cumo.CuMoForConditionalGeneration"}

    @property
    def vision_is_moe(self) -> bool:
        return self.vision_num_experts > 1

    @property
    def projector_is_moe(self) -> bool:
        return self.projector_num_experts > 1

    @property
    def num_feature_layers(self) -> int:
        """How many CLIP encoder layers produce the feature layer (the rest are only needed for the MoE losses)."""
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)


def _sub_config(value, model_type: str, defaults: dict) -> PreTrainedConfig:
    """`SubConfigSpec` of newer transformers: a dict (or None: the defaults) becomes the config of its `model_type`."""
    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(defaults if value is None else value)
    return AutoConfig.for_model(value.pop("model_type", model_type), **value)


CuMoConfig.register_for_auto_class()

__all__ = ["CuMoConfig"]
