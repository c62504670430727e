"""Write a toy setting for trying the training pipeline offline in a minute: a tiny random CLIP vision tower, a tiny
random Mistral with its own tokenizer, and LLaVA-style JSON datasets of coloured shapes (captions for the first two
stages, questions and answers for the third). Random stand-ins learn little; they only exercise the real code."""

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from hub_upload.random_checkpoint import make_tokenizer


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def draw(colour: str, shape: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(box, fill=COLOURS[colour])
    return image


def write_datasets(folder: Path, samples: int, seed: int) -> None:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions, questions = [], []
    for i in range(samples):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"images/{i:04d}.png"
        draw(colour, shape).save(folder / name)
        captions.append({"id": f"cap-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A {colour} {shape}."}]})
        questions.append({"id": f"qa-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": colour.capitalize() + "."},
            {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": shape.capitalize() + "."}]})
    (folder / "captions.json").write_text(json.dumps(captions, indent=1))
    (folder / "instructions.json").write_text(json.dumps(questions, indent=1))


def write_models(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=56, patch_size=14)).save_pretrained(folder / "clip")
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
    args = parser.parse_args(argv)
    write_models(args.output, args.seed)
    write_datasets(args.output, args.samples, args.seed)
    print(f"Wrote {args.output}/clip, {args.output}/llm, {args.output}/captions.json and {args.output}/instructions.json")


if __name__ == "__main__":
    main()
