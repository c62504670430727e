"""Does the LLM look at the object a question names? For held-out colour, shape and position questions on images
with 2-3 shapes, the attention of every LLM head from the last prompt token (where the answer starts) and from
the question's last tokens to the image tokens, split by quadrant.

    python -m trainer.demo.attention --output demo     # the folder of `cumo-demo --output demo`

Selectivity is the share of a head's image attention on the asked object's quadrant minus the mean share on the
other objects' quadrants: about 0 for a head that sees every object alike, 1 for one that reads only the asked
object. Looking up "the triangle" among three shapes needs some head well above 0; `probe` says whether the tokens
it would read hold the answer. Prints the best head per layer and writes DIR/attention.json.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from trainer.demo import world

QUESTION_TOKENS = 10  # the prompt's last tokens: the question's words, its '?' and the ' [/INST]' after it


def selectivity(attention: torch.Tensor, quadrant_of: torch.Tensor, target: int, others: list[int]) -> torch.Tensor:
    """`attention` (..., image tokens): share on quadrant `target` minus the mean share on `others`, both as parts
    of the attention on the image."""
    on_image = attention.sum(-1).clamp(min=1e-9)
    on_target = attention[..., quadrant_of == target].sum(-1)
    on_others = torch.stack([attention[..., quadrant_of == q].sum(-1) for q in others]).mean(0)
    return (on_target - on_others) / on_image


@torch.no_grad()
def measure(model_folder: Path, data: Path, questions: int = 150) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(model_folder, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_folder)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    scenes = {row["image"]: world.parse_caption(row["conversations"][1]["value"])
              for row in json.loads((data / "heldout_captions.json").read_text())}
    asked = [(row, scenes[row["image"]], world.asked_object(row["type"], row["question"], scenes[row["image"]]))
             for row in json.loads((data / "heldout_vqa.json").read_text()) if len(scenes[row["image"]]) > 1]
    asked = [(row, shapes, target) for row, shapes, target in asked if target is not None][:questions]
    if not asked:
        raise ValueError(f"{data} has no held-out colour, shape or position questions on images with 2-3 shapes.")
    total = None
    for row, shapes, target in asked:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
            add_generation_prompt=True)
        inputs = processor(images=[Image.open(data / row["image"])], text=[prompt], return_tensors="pt")
        attentions = model(**inputs, output_attentions=True).attentions  # per layer: (1, heads, queries, keys)
        image = (inputs["input_ids"][0] == image_token).nonzero()[:, 0]
        quadrant_of = torch.tensor(world.token_quadrants(len(image)))
        on_image = torch.stack([layer[0, :, -QUESTION_TOKENS:][..., image] for layer in attentions])
        found = selectivity(on_image, quadrant_of, target.quadrant, [s.quadrant for s in shapes if s != target])
        total = found if total is None else total + found
    mean = total / len(asked)  # (layers, heads, last QUESTION_TOKENS prompt positions)
    layers = []
    for layer in mean:
        head, offset = divmod(int(layer.argmax()), layer.shape[1])
        layers.append({"answer_position_best_head": int(layer[:, -1].argmax()),
                       "answer_position_selectivity": layer[:, -1].max().item(),
                       "answer_position_mean_over_heads": layer[:, -1].mean().item(),
                       "question_best": {"head": head, "tokens_before_answer": layer.shape[1] - 1 - offset,
                                         "selectivity": layer.max().item()}})
    return {"questions": len(asked), "layers": layers}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="a `cumo-demo` folder (its model/ and work/data/)")
    parser.add_argument("--questions", type=int, default=150, help="held-out questions to average over")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error("--questions must be at least 1")
    report = measure(args.output / "model", args.output / "work" / "data", args.questions)
    (args.output / "attention.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"Selectivity for the asked object, {report['questions']} held-out questions on 2-3-shape images:")
    print("| LLM layer | answer position: best head | mean over heads | question tokens: best (tokens before answer) |")
    print("|---:|---:|---:|---:|")
    for k, layer in enumerate(report["layers"]):
        best = layer["question_best"]
        print(f"| {k} | {layer['answer_position_selectivity']:.3f} (head {layer['answer_position_best_head']}) | "
              f"{layer['answer_position_mean_over_heads']:.3f} | {best['selectivity']:.3f} (head {best['head']}, "
              f"{best['tokens_before_answer']}) |")


if __name__ == "__main__":
    main()
