"""`cumo-demo`: build the demo world and a CuMo trained in it, end to end, offline.

    cumo-demo --output demo            # the full run (about 15 minutes on 2 CPU cores)
    cumo-demo --output demo --quick    # a reduced run (a couple of minutes)

Steps: generate the world (images of coloured shapes, captions, questions, a held-out split); train the stand-ins
(a small CLIP, contrastively, and a small Mistral with its own tokenizer); then `cumo-init` and `cumo-train` for
the paper's three stages (pt, pft, vit) exactly as on real models; finally evaluate on the held-out split.
Writes DIR/model (the final CuMo), DIR/metrics.json and DIR/expert_load.png.
"""

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from trainer import init_model, train
from trainer.demo import evaluate, standins, world


@dataclass
class Budget:
    train_images: int
    heldout_images: int
    clip_steps: int
    llm_steps: int
    pt_steps: int
    pft_steps: int
    vit_steps: int


FULL = Budget(train_images=3000, heldout_images=200, clip_steps=500, llm_steps=300, pt_steps=150, pft_steps=300,
              vit_steps=700)
QUICK = Budget(train_images=800, heldout_images=60, clip_steps=200, llm_steps=250, pt_steps=60, pft_steps=60,
               vit_steps=200)
IMAGE_SIZE, PATCH_SIZE = 64, 8


def stage_args(stage: str, model: Path, data: Path, output: Path, steps: int, lr: float, seed: int) -> list[str]:
    args = [
        "--stage", stage, "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(output),
        "--max_steps", str(steps), "--learning_rate", str(lr), "--per_device_train_batch_size", "16",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--weight_decay", "0.0", "--logging_steps", "10",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
        "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--seed", str(seed),
    ]
    return args


def build_demo(output: Path, budget: Budget, seed: int = 0, scales=(1, 2), log=print) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    timings = {}
    start = time.perf_counter()

    def lap(name):
        nonlocal start
        timings[name] = round(time.perf_counter() - start, 1)
        log(f"[cumo-demo] {name}: {timings[name]} s")
        start = time.perf_counter()

    data = work / "data"
    world.write_split(data, "train", budget.train_images, IMAGE_SIZE, seed)
    world.write_split(data, "heldout", budget.heldout_images, IMAGE_SIZE, seed + 1)
    lap("world")

    texts = world.corpus(data, "train")
    tokenizer = standins.train_tokenizer(texts, work / "tokenizer")
    captions = json.loads((data / "train_captions.json").read_text())
    standins.train_clip([data / row["image"] for row in captions], [row["conversations"][1]["value"] for row in captions],
                        tokenizer, work / "clip", IMAGE_SIZE, PATCH_SIZE, budget.clip_steps, seed=seed)
    lap("clip stand-in")
    chats = []
    for suffix in ("captions", "instructions"):
        for row in json.loads((data / f"train_{suffix}.json").read_text()):
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<image>\n", "")}
                        for t in row["conversations"]]
            chats.append(tokenizer.apply_chat_template(messages, tokenize=False))
    standins.train_llm(chats + texts, tokenizer, work / "llm", budget.llm_steps, seed=seed)
    lap("llm stand-in")

    init_model.main(["--vision-tower", str(work / "clip"), "--llm", str(work / "llm"), "--output", str(work / "init"),
                     "--dtype", "float32", "--scales", *map(str, scales)])
    train.main(stage_args("pt", work / "init", data / "train_captions.json", work / "pt", budget.pt_steps, 1e-3, seed))
    lap("stage pt")
    train.main(stage_args("pft", work / "pt", data / "train_captions.json", work / "pft", budget.pft_steps, 5e-4, seed))
    lap("stage pft")
    train.main(stage_args("vit", work / "pft", data / "train_instructions.json", work / "vit", budget.vit_steps, 1e-3,
                          seed))
    lap("stage vit")

    final = output / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(work / "vit", final, ignore=shutil.ignore_patterns("training_args.bin", "checkpoint-*"))
    model = AutoModelForImageTextToText.from_pretrained(final, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(final, trust_remote_code=True)
    heldout = json.loads((data / "heldout_vqa.json").read_text())
    metrics = evaluate.vqa_accuracy(model, processor, heldout, data)
    images = sorted({data / row["image"] for row in heldout})
    metrics["expert_load"] = evaluate.expert_load(model, processor, images)
    lap("evaluation")
    metrics.update(chance_accuracy=chance(heldout), seconds=timings, budget=budget.__dict__, scales=list(scales),
                   torch_threads=torch.get_num_threads())
    evaluate.write_metrics(output / "metrics.json", metrics)
    evaluate.plot_expert_load(metrics["expert_load"], output / "expert_load.png",
                              f"Expert load on the held-out split (VQA accuracy {metrics['vqa_accuracy']:.2f})")
    return metrics


def chance(rows: list[dict]) -> float:
    """Accuracy of always answering each question type's most common held-out answer."""
    best = {}
    for kind in {row["type"] for row in rows}:
        answers = [row["answer"] for row in rows if row["type"] == kind]
        best[kind] = max(answers.count(a) for a in set(answers))
    return sum(best.values()) / len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cumo-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for model/, metrics.json, expert_load.png")
    parser.add_argument("--quick", action="store_true", help="reduced run: fewer samples and steps")
    parser.add_argument("--seed", type=int, default=0)
    for name in Budget.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override the budget's {name} (full {getattr(FULL, name)}, quick {getattr(QUICK, name)})")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    budget = Budget(**{name: getattr(args, name) or getattr(budget, name) for name in Budget.__dataclass_fields__})
    metrics = build_demo(args.output, budget, args.seed)
    print(json.dumps({k: metrics[k] for k in ("vqa_accuracy", "accuracy_per_type", "chance_accuracy", "seconds")}, indent=2))
    print(f"Chat with it: python -m space.app --model {args.output / 'model'}")


if __name__ == "__main__":
    main()
