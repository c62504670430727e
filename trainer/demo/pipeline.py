"""The demo pipeline: the world, the stand-ins, the paper's three stages through cumo-init / cumo-train, and the
held-out evaluation. `cumo-demo` runs it; `trainer.demo.ablations` reuses its parts."""

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

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
    patch_size: int = field(default=8, metadata={"help": (
        "the CLIP stand-in's patch side in pixels; 16 gives 16 image tokens instead of 64 and a run about 6 minutes "
        "shorter on 2 cores, but held-out VQA 0.87-0.99 over seeds 0-2 instead of 0.92-0.97 (float32 stand-ins and "
        "1200 vit steps; docs/demo_experiments.md)")})
    llm_colour_steps: int = field(default=0, metadata={"help": (
        "how many of the LLM stand-in's first steps learn only colour questions on 2-3 shapes (the one lookup of an "
        "object by its shape), before the whole mix; 200 with --patch-size 16 made colour answers right in seeds 0-2, "
        "but not in every world (the lookup can fade in the mix) and position answers stayed weak "
        "(docs/demo_experiments.md)")})
    stand_in_dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16"), "help": (
        "bfloat16 trains the CLIP and LLM stand-ins under bf16 autocast (attention in float32): an LLM stand-in step "
        "in about 0.7 of the time, for CPUs with AMX or AVX512-BF16 (refused elsewhere: emulated bf16 is slower); "
        "auto (the default) is bfloat16 where the CPU has them, float32 elsewhere; metrics.json records which ran "
        "(docs/demo_experiments.md compares the two)")})


# The full budget takes about 11-18 minutes on 2 CPU cores with bf16 stand-ins (the same run, in different hours of
# one machine); docs/demo_experiments.md has what each step count buys (the LLM stand-in needs enough steps on scenes
# for its lookup to form).
FULL = Budget(train_images=3000, heldout_images=200, clip_steps=800, llm_steps=700, pt_steps=150, pft_steps=300,
              vit_steps=1000)
QUICK = Budget(train_images=800, heldout_images=60, clip_steps=200, llm_steps=150, pt_steps=60, pft_steps=60,
               vit_steps=200)
IMAGE_SIZE = world.IMAGE_SIZE
SCALES = (1, 2)
LEARNING_RATES = {"pt": 1e-3, "pft": 5e-4, "vit": 1e-3}


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="reduced run: fewer samples and steps")
    parser.add_argument("--seed", type=int, default=0)
    for name, spec in Budget.__dataclass_fields__.items():
        detail = f": {spec.metadata['help']}" if "help" in spec.metadata else ""
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(FULL, name)), default=None,
                            choices=spec.metadata.get("choices"),
                            help=f"override the budget's {name} (full {getattr(FULL, name)}, quick {getattr(QUICK, name)}){detail}")


def budget_from_args(args: argparse.Namespace) -> Budget:
    budget = QUICK if args.quick else FULL
    budget = Budget(**{name: getattr(budget, name) if getattr(args, name) is None else getattr(args, name)
                       for name in Budget.__dataclass_fields__})
    for name in ("train_images", "heldout_images", "clip_steps", "llm_steps", "pt_steps", "pft_steps", "vit_steps"):
        if getattr(budget, name) < 1:  # a trainer given 0 steps would train whole epochs instead
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(budget, name)}: it must be at least 1.")
    if budget.patch_size <= 0 or IMAGE_SIZE % (2 * budget.patch_size):
        raise SystemExit(f"--patch-size {budget.patch_size}: the patches must tile each quadrant of the {IMAGE_SIZE}-pixel "
                         f"images (2, 4, 8, 16 or 32).")
    if not 0 <= budget.llm_colour_steps < budget.llm_steps:
        raise SystemExit(f"--llm-colour-steps {budget.llm_colour_steps}: it must be at least 0 and below --llm-steps "
                         f"({budget.llm_steps}), which it is part of.")
    if budget.stand_in_dtype == "bfloat16" and not standins.has_native_bf16():
        raise SystemExit("--stand-in-dtype bfloat16: this CPU has neither AMX nor AVX512-BF16, so bf16 would be emulated "
                         "and slower than float32.")
    return resolve_stand_in_dtype(budget)


def resolve_stand_in_dtype(budget: Budget) -> Budget:
    """The budget with "auto" replaced by the dtype this CPU trains the stand-ins in, so that the metrics say which."""
    if budget.stand_in_dtype != "auto":
        return budget
    return dataclasses.replace(budget, stand_in_dtype="bfloat16" if standins.has_native_bf16() else "float32")


def stand_in_dtype(budget: Budget) -> torch.dtype:
    return getattr(torch, resolve_stand_in_dtype(budget).stand_in_dtype)


def stage_args(stage: str, model: Path, data: Path, output: Path, steps: int, seed: int) -> list[str]:
    return [
        "--stage", stage, "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(output),
        "--max_steps", str(steps), "--learning_rate", str(LEARNING_RATES[stage]), "--per_device_train_batch_size", "16",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--weight_decay", "0.0", "--logging_steps", "10",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
        "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--seed", str(seed),
    ]


class Laps:
    """Seconds per pipeline step, logged as they finish."""

    def __init__(self, log=print):
        self.log, self.seconds, self.start = log, {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self.start, 1)
        self.log(f"[cumo-demo] {name}: {self.seconds[name]} s")
        self.start = time.perf_counter()


def write_world(work: Path, budget: Budget, seed: int) -> tuple[Path, PreTrainedTokenizerFast]:
    """The world's train and held-out splits (work/data) and the tokenizer trained on its texts."""
    data = work / "data"
    world.write_split(data, "train", budget.train_images, IMAGE_SIZE, seed)
    world.write_split(data, "heldout", budget.heldout_images, IMAGE_SIZE, seed + 1)
    return data, standins.train_tokenizer(world.corpus(data, "train"), work / "tokenizer")


def image_tokens(budget: Budget) -> int:
    return (IMAGE_SIZE // budget.patch_size) ** 2


def train_llm_standin(work: Path, tokenizer, budget: Budget, seed: int, callback=None):
    """The LLM stand-in learns the world's chats on scenes given in words, one token per image patch, before it sees
    an image: the form the projector then learns to give real images (docs/demo_experiments.md compares the choices)."""
    lookups = world.colour_lookup_chats(budget.llm_colour_steps * standins.LLM_BATCH_SIZE, seed)
    chats = lookups + world.scene_chats(budget.llm_steps * standins.LLM_BATCH_SIZE, seed)
    scenes = standins.SceneBatches(tokenizer, chats, image_tokens(budget))
    return standins.train_llm(scenes, tokenizer, work / "llm", budget.llm_steps, seed=seed, callback=callback,
                              first=(budget.llm_colour_steps, len(lookups)), dtype=stand_in_dtype(budget))


def build_until_vit(work: Path, budget: Budget, seed: int, laps: Laps) -> Path:
    """World, stand-ins, cumo-init, pt and pft: everything the vit stage starts from. Returns the data folder."""
    data, tokenizer = write_world(work, budget, seed)
    laps("world")

    pairs = [(row["image"], row["conversations"][1]["value"]) for row in json.loads((data / "train_captions.json").read_text())]
    pairs += [(row["image"], row["caption"]) for row in json.loads((data / "train_regions.json").read_text())]
    objects = world.object_texts()
    patches = [world.patch_objects(text, objects, image_tokens(budget)) for _, text in pairs]
    standins.train_clip([data / image for image, _ in pairs], [text for _, text in pairs], tokenizer, work / "clip",
                        IMAGE_SIZE, budget.patch_size, budget.clip_steps, seed=seed, patch_objects=patches, objects=objects,
                        dtype=stand_in_dtype(budget))
    laps("clip stand-in")
    train_llm_standin(work, tokenizer, budget, seed)
    laps("llm stand-in")

    init_model.main(["--vision-tower", str(work / "clip"), "--llm", str(work / "llm"), "--output", str(work / "init"),
                     "--dtype", "float32", "--scales", *map(str, SCALES)])
    train.main(stage_args("pt", work / "init", data / "train_captions.json", work / "pt", budget.pt_steps, seed))
    laps("stage pt")
    train.main(stage_args("pft", work / "pt", data / "train_captions.json", work / "pft", budget.pft_steps, seed))
    laps("stage pft")
    return data


def train_vit(work: Path, data: Path, output: Path, budget: Budget, seed: int, extra: list[str] = ()) -> None:
    train.main(stage_args("vit", work / "pft", data / "train_instructions.json", output, budget.vit_steps, seed)
               + list(extra))


def evaluate_model(folder: Path, data: Path) -> dict:
    """Held-out VQA accuracy per type, chance level, exact match of whole descriptions ("Describe the image.", not a
    VQA type), the answers to the Space's examples, and the expert load of every MoE layer."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    heldout = json.loads((data / "heldout_vqa.json").read_text())
    metrics = evaluate.vqa_accuracy(model, processor, heldout, data)
    descriptions = [{"image": row["image"], "type": "describe", "answer": row["conversations"][1]["value"],
                     "question": row["conversations"][0]["value"].replace("<image>\n", "")}
                    for row in json.loads((data / "heldout_instructions.json").read_text()) if "-describe-" in row["id"]]
    described = evaluate.vqa_accuracy(model, processor, descriptions, data, max_new_tokens=48)
    metrics["description_exact_match"], metrics["descriptions"] = described["vqa_accuracy"], described["vqa_questions"]
    metrics["space_examples"] = evaluate.space_examples(model, processor, world.example_image(), world.example_chats())
    images = sorted({data / row["image"] for row in heldout})
    metrics["expert_load"] = evaluate.expert_load(model, processor, images)
    metrics["chance_accuracy"] = chance(heldout)
    return metrics


def build_demo(output: Path, budget: Budget, seed: int = 0, log=print) -> dict:
    """The whole demo: writes output/model, output/metrics.json and output/expert_load.png; returns the metrics."""
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    budget = resolve_stand_in_dtype(budget)
    machine = evaluate.environment()
    log(f"[cumo-demo] seed {seed} on {machine['cpu']} ({machine['torch_threads']} threads), torch {machine['torch']}, "
        f"transformers {machine['transformers']}, trl {machine['trl']}; stand-ins in {budget.stand_in_dtype}")
    laps = Laps(log)
    data = build_until_vit(work, budget, seed, laps)
    train_vit(work, data, work / "vit", budget, seed)
    laps("stage vit")

    final = output / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(work / "vit", final, ignore=shutil.ignore_patterns("training_args.bin", "checkpoint-*"))
    metrics = evaluate_model(final, data)
    metrics["llm_standin_lookups"] = standins.lookup_accuracy(
        AutoModelForCausalLM.from_pretrained(work / "llm"), AutoTokenizer.from_pretrained(work / "llm"),
        image_tokens(budget), seed=seed)
    laps("evaluation")
    log("[cumo-demo] LLM stand-in, before any image, on scenes in words (2-3 shapes): "
        + ", ".join(f"{kind} {share:.2f}" for kind, share in metrics["llm_standin_lookups"].items()))
    for example in metrics["space_examples"]:
        log(f"[cumo-demo] Space example {example['question']!r}: {example['answer']!r} "
            + ("(right)" if example["right"] else f"(WRONG, the world says {example['expected']!r})"))
    metrics.update(seed=seed, seconds=laps.seconds, minutes=round(sum(laps.seconds.values()) / 60, 1),
                   budget=budget.__dict__, scales=list(SCALES), environment=machine)
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
