"""`cumo-init`: build a fresh dense CuMo from a CLIP or SigLIP vision tower and a causal language model, ready for
stage `pt`.

The encoder's weights (from a CLIPModel / SiglipModel or a bare vision model checkpoint) and the language model's
weights are copied in, the projector is freshly initialised, `<image>` is added to the tokenizer as a special token,
and the folder gets the CuMo chat template, the processor and the remote code.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel, GenerationConfig, SiglipVisionModel
from transformers.modeling_utils import local_torch_dtype

from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration, CuMoProcessor
from modeling_cumo.vision_cumo import VISION_TOWERS
from hub_upload.folders import image_processor_for
from hub_upload.sentencepiece_tokenizer import cumo_tokenizer


# transformers' vision model of each encoder CuMo takes, to read its checkpoint's weights
VISION_MODELS = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}


def vision_tower_config(vision_tower: str):
    """The vision config of a CLIP or SigLIP folder or Hub id (a full CLIPConfig / SiglipConfig or a bare one)."""
    config = AutoConfig.from_pretrained(vision_tower)
    config = getattr(config, "vision_config", config)
    if config.model_type not in VISION_MODELS:
        raise ValueError(f"{vision_tower} is a {config.model_type!r} model; CuMo's vision tower is CLIP or SigLIP.")
    return config


def build(vision_tower: str, llm: str, scales=(1, 3), dtype: str = "float32", image_token: str = "<image>"):
    """The dense CuMo and its processor (nothing written)."""
    torch_dtype = getattr(torch, dtype)
    tokenizer = cumo_tokenizer(llm, image_token)
    vision_config = vision_tower_config(vision_tower)
    language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=torch_dtype)
    text_config = language_model.config
    config = CuMoConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), scales=list(scales),
        image_token_id=tokenizer.convert_tokens_to_ids(image_token), vision_num_experts=0, projector_num_experts=0,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    with local_torch_dtype(torch_dtype):
        model = CuMoForConditionalGeneration(config)

    encoder = VISION_MODELS[vision_config.model_type].from_pretrained(vision_tower, dtype=torch_dtype)
    missing, unexpected = model.model.vision_tower.load_state_dict(encoder.state_dict(), strict=False)
    # the tower leaves out what CuMo does not use: the post-layernorm and SigLIP's pooling head
    if missing or any(not key.startswith(("post_layernorm.", "head.")) for key in unexpected):
        raise ValueError(f"Encoder weights do not fit the vision tower: missing {missing}, unexpected {unexpected}")
    del encoder
    model.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.generation_config = language_model.generation_config or GenerationConfig.from_model_config(text_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del language_model
    processor = CuMoProcessor(image_processor_for(vision_tower, vision_config.image_size, vision_config.model_type),
                              tokenizer, patch_size=vision_config.patch_size, image_token=image_token,
                              num_additional_image_tokens=VISION_TOWERS[vision_config.model_type].num_prefix_tokens)
    return model, processor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-tower", required=True, help="CLIP or SigLIP folder or Hub id (e.g. "
                        "openai/clip-vit-large-patch14-336, google/siglip-so400m-patch14-384)")
    parser.add_argument("--llm", required=True, help="causal LM folder or Hub id (e.g. mistralai/Mistral-7B-Instruct-v0.2)")
    parser.add_argument("--output", type=Path, required=True, help="folder to write the CuMo model to")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 3], help="S2 scales (default: 1 3)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: bfloat16)")
    args = parser.parse_args(argv)
    model, processor = build(args.vision_tower, args.llm, args.scales, args.dtype)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"Wrote a dense CuMo ({model.num_parameters() / 1e9:.2f}B parameters) to {args.output}; "
          f"next: cumo-train --config trainer/recipes/pt.yaml --model_name_or_path {args.output}")


if __name__ == "__main__":
    main()
