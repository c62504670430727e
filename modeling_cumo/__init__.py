"""CuMo as a transformers remote-code model. The files here are copied next to the weights on save."""

from .configuration_cumo import CuMoConfig
from .modeling_cumo import (
    CuMoCausalLMOutputWithPast,
    CuMoForConditionalGeneration,
    CuMoImageFeaturesOutput,
    CuMoModel,
    CuMoModelOutputWithPast,
    CuMoPreTrainedModel,
)
from .processing_cumo import CuMoProcessor

__all__ = [
    "CuMoCausalLMOutputWithPast",
    "CuMoConfig",
    "CuMoForConditionalGeneration",
    "CuMoImageFeaturesOutput",
    "CuMoModel",
    "CuMoModelOutputWithPast",
    "CuMoPreTrainedModel",
    "CuMoProcessor",
]
