"""Write a toy setting for trying the training pipeline offline in a minute: a tiny random CLIP vision tower, a tiny
random Mistral with its own tokenizer, and the demo world's LLaVA-style JSON datasets (`trainer.demo.world`:
captions for the first two stages, questions and answers for the third). Random stand-ins learn little; they only
exercise the real code (`cumo-demo` trains ones that do learn)."""

import argparse
from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM, SiglipVisionConfig,
                          SiglipVisionModel)

from hub_upload.random_checkpoint import make_tokenizer
from trainer.demo import world


def write_datasets(folder: Path, samples: int, seed: int) -> None:
    """A split of the world in folder/images/ (`world.write_split`), its captions and instructions renamed to
    captions.json and instructions.json (the names the README's commands use)."""
    world.write_split(folder, "images", samples, world.IMAGE_SIZE, seed)
    for suffix in ("captions", "instructions"):
        (folder / f"images_{suffix}.json").replace(folder / f"{suffix}.json")


def write_models(folder: Path, seed: int, encoder: str = "clip") -> None:
    """folder/clip (or folder/siglip) and folder/llm: tiny random stand-ins of the two pretrained parts."""
    torch.manual_seed(seed)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                 patch_size=14)
    vision = SiglipVisionModel(SiglipVisionConfig(**shape)) if encoder == "siglip" else \
        CLIPVisionModel(CLIPVisionConfig(**shape))
    vision.save_pretrained(folder / encoder)
    tokenizer = make_tokenizer()
    llm = MistralForCausalLM(MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    llm.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="folder to write clip/, llm/ and the datasets to")
    parser.add_argument("--samples", type=int, default=64, help="images in the datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", choices=("clip", "siglip"), default="clip",
                        help="vision encoder of the stand-in (paper, Table 5): written to OUTPUT/clip or OUTPUT/siglip")
    args = parser.parse_args(argv)
    write_models(args.output, args.seed, args.encoder)
    write_datasets(args.output, args.samples, args.seed)
    print(f"Wrote {args.output}/{args.encoder}, {args.output}/llm, {args.output}/captions.json and {args.output}/instructions.json")


if __name__ == "__main__":
    main()
