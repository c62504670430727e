"""`cumo-train`: one stage of the paper's recipe (or a fine-tune) with `CuMoSFTTrainer`.

    cumo-train --config trainer/recipes/pt.yaml --model_name_or_path checkpoints/cumo-init --output_dir checkpoints/pt

Every field of `CuMoSFTConfig` (TRL's `SFTConfig` plus `--stage`, `--upcycle_*`, `--on_bad_image`), of TRL's
`ModelConfig` (`--model_name_or_path`, `--dtype`, `--attn_implementation`, `--use_peft`, `--lora_*`) and the data
options below can be set in the YAML recipe and overridden on the command line. For several GPUs, start it with
`accelerate launch --config_file trainer/accelerate/zero3.yaml -m trainer.train ...`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset, load_from_disk
from trl import ModelConfig, TrlParser, get_peft_config

from modeling_cumo import CuMoForConditionalGeneration, CuMoProcessor

from .config import CuMoSFTConfig
from .data import load_llava_json
from .sft_trainer import CuMoSFTTrainer


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-style .json/.jsonl file, a dataset folder saved with "
                                              "`save_to_disk`, or a Hub dataset in TRL's messages + images format."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the LLaVA JSON's image paths are "
                                                                     "relative to (default: the JSON's folder)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub or on-disk dataset."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation data, as data_path."})
    require_answers: bool = field(default=True, metadata={"help": "Fail when no LLaVA JSON sample has an answer "
                                                                  "(false: only warn)."})


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a checkpoint the Trainer can resume from (a kill during saving leaves part of one)."""
    if not (folder / "trainer_state.json").is_file():
        return "it has no trainer_state.json"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except ValueError:
        return "its trainer_state.json is cut short"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return "it has no model weights"
    return None


def resolve_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a folder (checked to be complete) or true/last (the newest complete checkpoint
    in output_dir). An incomplete one is refused with the name of the last complete one."""
    if value in (None, False, "", "false", "False"):
        return None
    latest = value in (True, "true", "True", "last")
    folder = Path(output_dir) if latest else Path(value).parent
    complete = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                       and checkpoint_problem(p) is None), key=lambda p: int(p.name.split("-")[-1]))
    fallback = f"the last complete one is {complete[-1]}" if complete else f"{folder} holds no complete checkpoint"
    if latest:
        if not complete:
            raise ValueError(f"Cannot resume: {fallback}.")
        return str(complete[-1])
    if not Path(value).is_dir():
        raise ValueError(f"Cannot resume from {value}: no such folder; {fallback}.")
    if problem := checkpoint_problem(Path(value)):
        raise ValueError(f"Cannot resume from {value}: {problem} (a save was interrupted); {fallback}.")
    return str(value)


def load_data(path: str, image_folder: str | None, split: str, on_bad_image: str, require_answers: bool = True):
    if path.endswith((".json", ".jsonl")):
        return load_llava_json(path, image_folder, on_bad_image=on_bad_image, require_answers=require_answers)
    if Path(path).is_dir():
        dataset = load_from_disk(path)
        return dataset[split] if hasattr(dataset, "keys") else dataset
    return load_dataset(path, split=split)


def main(argv=None):
    parser = TrlParser((DataArguments, CuMoSFTConfig, ModelConfig))
    data_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required (a CuMo folder, e.g. from cumo-init or the previous stage)")
    try:
        resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    # This package's classes, whatever remote-code copy the folder holds (saving writes fresh copies)
    model = CuMoForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype or "auto",
        attn_implementation=model_args.attn_implementation)
    processor = CuMoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        # LoRA on the language model; the projector (and the vision tower after pre-training) train in full
        peft_config.target_modules = peft_config.target_modules or LORA_TARGETS
        full = ["multi_modal_projector"] if training_args.stage == "pt" else ["multi_modal_projector", "vision_tower"]
        peft_config.modules_to_save = peft_config.modules_to_save or full
    train = load_data(data_args.data_path, data_args.image_folder, data_args.dataset_split, training_args.on_bad_image,
                      data_args.require_answers)
    evaluation = load_data(data_args.eval_data_path, data_args.image_folder, data_args.dataset_split,
                           training_args.on_bad_image) if data_args.eval_data_path else None
    trainer = CuMoSFTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=processor, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=resume)
    if peft_config is None:
        trainer.save_model(training_args.output_dir)
    elif trainer.is_world_process_zero():
        # The next stage and `from_pretrained` want a whole model: fold the LoRA weights in
        trainer.model.merge_and_unload().save_pretrained(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
