"""Real-size CuMo, built on the meta device: parameter counts match the paper's Table 7."""

import pytest
import torch

from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration


@pytest.mark.parametrize(
    "text_model, total, activated",
    [("mistral", 8.26e9, 7.80e9), ("mixtral", 47.71e9, 13.45e9)],  # CuMo-7B and CuMo-8x7B
)
def test_real_size_parameter_counts(text_model, total, activated):
    # defaults: CLIP ViT-L/14-336, S2 scales [1, 3], top-2-of-4 MoE in CLIP and projector; Mistral/Mixtral defaults
    config = CuMoConfig(text_config={"model_type": text_model})
    with torch.device("meta"):
        model = CuMoForConditionalGeneration(config)
    assert model.num_parameters() == pytest.approx(total, abs=0.02e9)
    assert model.num_activated_parameters() == pytest.approx(activated, abs=0.02e9)
    # per module (Table 7 gives 0.91B / 0.50B activated for the CLIP-MoE and 0.10B / 0.05B for the projector)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert vision == pytest.approx(0.91e9, abs=0.01e9) and projector == pytest.approx(0.10e9, abs=0.01e9)
