"""Held-out evaluation of a demo model: exact-match VQA accuracy per question type, the Space's examples, and expert
load per MoE layer (each expert's share of the top-k routing slots, as the paper's Figure 4 plots it)."""

import json
import platform
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch
from PIL import Image
from tqdm.auto import tqdm

from modeling_cumo.moe_cumo import CuMoTopKRouter
from trainer.demo.standins import has_native_bf16


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


@torch.no_grad()
def generate_answers(model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers as decoded (the template's spaces around them included), one question per image, each in a
    conversation of its own, as the Space's chat asks a first question."""
    processor.tokenizer.padding_side = "left"
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True) for question in questions]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def vqa_accuracy(model, processor, rows: list[dict], folder: Path, batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    """Exact-match accuracy overall, per question type, and per type and number of shapes in the image (one shape
    needs no looking for the asked-about object; two or three do)."""
    by_type, by_objects = defaultdict(list), defaultdict(lambda: defaultdict(list))  # -> [answered correctly?]
    for start in tqdm(range(0, len(rows), batch_size), desc="Evaluating VQA"):
        batch = rows[start : start + batch_size]
        answers = generate_answers(model, processor, [Image.open(folder / row["image"]) for row in batch],
                         [row["question"] for row in batch], max_new_tokens)
        for row, given in zip(batch, answers):
            right = normalise(given) == normalise(row["answer"])
            by_type[row["type"]].append(right)
            if "objects" in row:  # data written before this field: no split
                by_objects[row["type"]][str(row["objects"])].append(right)
    everything = [right for rights in by_type.values() for right in rights]
    return {"vqa_accuracy": mean(everything),
            "accuracy_per_type": {kind: mean(rights) for kind, rights in sorted(by_type.items())},
            "accuracy_per_type_and_objects": {kind: {n: mean(rights) for n, rights in sorted(by_objects[kind].items())}
                                              for kind in sorted(by_type)},
            "vqa_questions": len(everything)}


def space_examples(model, processor, image: Image.Image, chats: list[tuple[str, str]]) -> list[dict]:
    """The model's answer to each of the Space's examples (`world.example_chats`), and whether it is the world's.
    Matched exactly, as the app shows it (stripped): the visitor reads the answer, not a normalised one."""
    rows = []
    for question, expected in chats:  # one at a time, unpadded, as the app asks
        given = generate_answers(model, processor, [image], [question], max_new_tokens=48)[0].strip()
        rows.append({"question": question, "expected": expected, "answer": given, "right": given == expected})
    return rows


def layer_label(name: str) -> str:
    if "vision_tower" in name:
        return f"vision layer {int(name.split('layers.')[1].split('.')[0])}"
    return "projector" if "multi_modal_projector" in name else name


@torch.no_grad()
def expert_load(model, processor, images: list[Path], batch_size: int = 32) -> dict[str, list[float]]:
    """Share of the top-k slots each expert receives, per MoE layer, over `images` (all S2 crops, CLS included,
    and every CLIP layer, as in training)."""
    counts, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, CuMoTopKRouter):
            counts[layer_label(name)] = torch.zeros(module.num_experts, dtype=torch.long)

            def hook(module, args, output, label=layer_label(name)):
                counts[label] += torch.bincount(output[2].reshape(-1), minlength=module.num_experts)

            hooks.append(module.register_forward_hook(hook))
    try:
        for start in range(0, len(images), batch_size):
            pixels = processor.image_processor([Image.open(p) for p in images[start : start + batch_size]],
                                               return_tensors="pt")["pixel_values"]
            model.get_image_features(pixels, compute_router_losses=True)
    finally:
        for handle in hooks:
            handle.remove()
    return {label: (c / c.sum()).tolist() for label, c in counts.items()}


def plot_expert_load(load: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(load)
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers), 2.8), sharey=True, squeeze=False)
    for axis, layer in zip(axes[0], layers):
        shares = load[layer]
        axis.bar(range(len(shares)), shares, color=plt.cm.tab10.colors[: len(shares)])
        axis.axhline(1 / len(shares), color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(layer, fontsize=9)
        axis.set_xticks(range(len(shares)), [f"E{i}" for i in range(len(shares))], fontsize=8)
    axes[0][0].set_ylabel("share of top-k slots")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_metrics(path: Path, metrics: dict) -> None:
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def environment() -> dict:
    """What gave the figures: the CPU, the threads torch used, the Python and library versions (two runs of the same
    seed compare only where these agree; float sums differ between CPUs and thread counts)."""
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "platform": platform.platform(), "native_bf16": has_native_bf16()}
