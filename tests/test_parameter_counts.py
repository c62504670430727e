"""Real-size CuMo, built on the meta device: parameter counts match the paper's Table 7."""

import pytest
import torch

from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration
from modeling_cumo.moe_cumo import count_inactive_expert_parameters


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


SIGLIP_SO400M_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=384)


@pytest.mark.parametrize(
    "vision_config, dense, activated",
    [(None, 0.30e9, 0.50e9), (SIGLIP_SO400M_384, 0.43e9, 0.70e9)],  # CLIP ViT-L/14-336, SigLIP-SO400M/14-384
    ids=["clip", "siglip"],
)
def test_vision_encoder_parameter_counts(vision_config, dense, activated):
    """Paper Table 5 counts the encoder as published (transformers' vision model: post-layernorm and SigLIP's pooling
    head included, which CuMo's tower leaves out), dense and with top-2-of-4 MoE in every MLP: one more MLP copy
    activated per layer, plus the routers."""
    from transformers import AutoModel

    counts = {}
    for experts in (0, 4):
        config = CuMoConfig(vision_config=vision_config, text_config={"model_type": "mistral"},
                            vision_num_experts=experts, projector_num_experts=0)
        with torch.device("meta"):
            tower = CuMoForConditionalGeneration(config).model.vision_tower
            encoder = AutoModel.from_config(type(config.vision_config).from_dict(config.vision_config.to_dict()))
        counts[experts] = (tower.num_parameters(), tower.num_parameters() - count_inactive_expert_parameters(tower))
    vision = config.vision_config
    left_out = encoder.num_parameters() - counts[0][0]
    assert 0 < left_out < 0.02e9  # post-layernorm, and SigLIP's pooling head
    mlp = 2 * vision.hidden_size * vision.intermediate_size + vision.hidden_size + vision.intermediate_size
    routers = 4 * vision.hidden_size
    assert counts[4][1] == counts[0][0] + vision.num_hidden_layers * (mlp + routers)
    assert encoder.num_parameters() == pytest.approx(dense, abs=0.005e9)
    assert counts[4][1] + left_out == pytest.approx(activated, abs=0.01e9)
