"""CuMo as a transformers remote-code model. The files here are copied next to the weights on save."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_cumo import CuMoConfig
from .modeling_cumo import (CuMoCausalLMOutputWithPast, CuMoForConditionalGeneration, CuMoImageFeaturesOutput,
                            CuMoModel, CuMoModelOutputWithPast, CuMoPreTrainedModel)
from .processing_cumo import CuMoProcessor


# With this package installed, the Auto classes load a CuMo folder with its classes (no `trust_remote_code`): the
# remote-code copy saved in a folder serves where the package is absent, and never changes what the package runs.
AutoConfig.register(CuMoConfig.model_type, CuMoConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageTextToText):
    _auto.register(CuMoConfig, CuMoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(CuMoConfig, CuMoProcessor, exist_ok=True)

__all__ = ["CuMoCausalLMOutputWithPast", "CuMoConfig", "CuMoForConditionalGeneration", "CuMoImageFeaturesOutput",
           "CuMoModel", "CuMoModelOutputWithPast", "CuMoPreTrainedModel", "CuMoProcessor"]
