"""Which facts each image token carries: linear probes on the projected image tokens of a demo model (what its LLM
reads), for the colour, shape and quadrant of the object under the token.

    python -m trainer.demo.probe --output demo     # the folder of `cumo-demo --output demo`

A question such as "Where is the red circle?" can only be answered by looking up one object's tokens if those
tokens say what and where the object is. The probes are fitted on training images and scored on held-out ones;
a fact the probe cannot read is one the LLM cannot look up either, and a fact it reads that the model still gets
wrong points at the LLM's lookup (docs/demo_experiments.md). Prints a table and writes DIR/probe.json.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from trainer.demo import world

FACTS = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "quadrant": list(world.QUADRANTS)}


@torch.no_grad()
def object_tokens(model, processor, data: Path, split: str, images: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Projected image tokens lying in a quadrant that holds an object, and that object's facts as class indices."""
    rows = json.loads((data / f"{split}_captions.json").read_text())[:images]
    tokens, labels = [], {fact: [] for fact in FACTS}
    for start in range(0, len(rows), 32):
        batch = rows[start : start + 32]
        pixels = processor.image_processor([Image.open(data / row["image"]) for row in batch], return_tensors="pt")
        projected = model.get_image_features(pixels["pixel_values"]).pooler_output  # (images, grid * grid, hidden)
        quadrant_of = world.token_quadrants(projected.shape[1])
        for features, row in zip(projected, batch):
            shapes = {shape.quadrant: shape for shape in world.parse_caption(row["conversations"][1]["value"])}
            for t, quadrant in enumerate(quadrant_of):
                if quadrant in shapes:
                    tokens.append(features[t])
                    labels["colour"].append(FACTS["colour"].index(shapes[quadrant].colour))
                    labels["shape"].append(FACTS["shape"].index(shapes[quadrant].shape))
                    labels["quadrant"].append(quadrant)
    return torch.stack(tokens).float(), {fact: torch.tensor(values) for fact, values in labels.items()}


def probe_accuracy(train_x, train_y, test_x, test_y, classes: int, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a ridge least-squares probe (one-hot targets): closed form, so the figure is exact."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    design = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1)
    targets = torch.nn.functional.one_hot(train_y, classes).float()
    weights = torch.linalg.solve(design.T @ design + ridge * torch.eye(design.shape[1]), design.T @ targets)
    test = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], 1)
    return (test @ weights).argmax(1).eq(test_y).float().mean().item()


def run_probes(model_folder: Path, data: Path, train_images: int = 600, heldout_images: int = 200) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(model_folder).eval()
    processor = AutoProcessor.from_pretrained(model_folder)
    train_x, train_y = object_tokens(model, processor, data, "train", train_images)
    test_x, test_y = object_tokens(model, processor, data, "heldout", heldout_images)
    report = {}
    for fact, classes in FACTS.items():
        majority = torch.bincount(test_y[fact], minlength=len(classes)).max().item() / len(test_y[fact])
        report[fact] = {"probe_accuracy": probe_accuracy(train_x, train_y[fact], test_x, test_y[fact], len(classes)),
                        "majority_class": majority}
    report["tokens"] = {"train": len(train_x), "heldout": len(test_x)}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="a `cumo-demo` folder (its model/ and work/data/)")
    parser.add_argument("--train-images", type=int, default=600, help="training images whose tokens fit the probes")
    parser.add_argument("--heldout-images", type=int, default=200, help="held-out images whose tokens score them")
    args = parser.parse_args(argv)
    report = run_probes(args.output / "model", args.output / "work" / "data", args.train_images, args.heldout_images)
    (args.output / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| fact under the token | probe accuracy (held-out) | majority class |\n|---|---:|---:|")
    for fact in FACTS:
        print(f"| {fact} | {report[fact]['probe_accuracy']:.2f} | {report[fact]['majority_class']:.2f} |")


if __name__ == "__main__":
    main()
