"""Training data: the original project's LLaVA-style JSON as a TRL `messages` + `images` dataset, and its collator."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import PIL.Image
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from modeling_cumo.processing_cumo import to_rgb_image


logger = logging.getLogger(__name__)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def record_problem(record: Any) -> str | None:
    """What is wrong with the shape of one LLaVA-style record, or None: checked for every record before training,
    so that one message lists every bad sample instead of a crash at the first."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    image = record.get("image")
    if image is not None and not (isinstance(image, str) or
                                  (isinstance(image, list) and all(isinstance(i, str) for i in image))):
        return "'image' must be a file name or a list of file names"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "has no 'conversations' list"
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {number} needs a text 'value'"
        if turn.get("from") not in ROLES:
            return f"turn {number} has unknown speaker {turn.get('from')!r} (expected human or gpt)"
    return None


def llava_record_to_messages(record: dict, image_folder: Path | None) -> dict[str, Any]:
    """One LLaVA-style record -> `{"id", "messages", "images", "length"}`. As in the original, every `<image>` moves to the
    start of the first user turn; images stay paths (resolved against `image_folder`) until the collator loads them."""
    sample_id = str(record.get("id", ""))
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    messages = []
    for turn in record.get("conversations", []):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"Sample {sample_id!r}: unknown speaker {turn.get('from')!r} (expected human or gpt).")
        text = turn.get("value", "")
        content = [{"type": "text", "text": text.replace("<image>", "").strip()}]
        if role == "user" and not any(m["role"] == "user" for m in messages):
            placeholders = text.count("<image>") or len(images)
            if placeholders != len(images):
                raise ValueError(f"Sample {sample_id!r}: {placeholders} <image> placeholders for {len(images)} images.")
            content = [{"type": "image"}] * len(images) + content
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError(f"Sample {sample_id!r} has no conversation.")
    folder = Path(image_folder) if image_folder is not None else Path()
    # `length` (words, as the original's length grouping counts them) lets `train_sampling_strategy="group_by_length"`
    # batch short chats together instead of padding them to the longest of a random batch
    length = sum(len(part["text"].split()) for m in messages for part in m["content"] if part["type"] == "text")
    return {"id": sample_id, "messages": messages, "images": [str(folder / name) for name in images], "length": length}


def load_llava_json(path: str | Path, image_folder: str | Path | None = None,
                    on_bad_image: Literal["error", "skip"] = "error", require_answers: bool = True) -> Dataset:
    """Read a LLaVA-style JSON (or JSON-lines) file. Malformed records fail the load in one message that names them
    all; samples whose image files are missing are reported by id and skipped or fail the load (`on_bad_image`);
    unreadable contents (decompression bombs included) are caught when the collator loads them. A file in which no
    sample has an answer fails (`require_answers=False`: a warning)."""
    path = Path(path)
    text = path.read_text()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON or JSON lines: {error}") from error
    folder = Path(image_folder) if image_folder is not None else path.parent
    malformed = [f"{record.get('id', index) if isinstance(record, dict) else index}: {problem}"
                 for index, record in enumerate(records) if (problem := record_problem(record))]
    if malformed:
        raise ValueError(f"{len(malformed)} of {len(records)} records in {path} are malformed: "
                         + "; ".join(malformed[:10]) + (" ..." if len(malformed) > 10 else ""))
    rows, bad = [], []
    for record in records:
        row = llava_record_to_messages(record, folder)
        missing = [p for p in row["images"] if not Path(p).is_file()]
        if missing:
            bad.append(f"{row['id']}: {missing[0]}")
            continue
        rows.append(row)
    if bad:
        message = f"{len(bad)} of {len(records)} samples in {path} have missing images: " + "; ".join(bad[:10])
        if on_bad_image == "error":
            raise ValueError(message + (" ..." if len(bad) > 10 else "") + " (skip them with on_bad_image='skip')")
        logger.warning(message + (" ..." if len(bad) > 10 else "") + " -- skipped")
    if not rows:
        raise ValueError(f"No usable samples in {path}.")
    if not any(part["text"].strip() for row in rows for m in row["messages"] if m["role"] == "assistant"
               for part in m["content"] if part["type"] == "text"):
        message = f"No sample in {path} has an answer (a non-empty gpt turn): there is nothing to learn."
        if require_answers:
            raise ValueError(message)
        logger.warning(message + " Training would run at loss 0.")
    return Dataset.from_list(rows)


@dataclass
class CuMoDataCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision-language collator, plus: images given as paths are loaded here (lazily, per batch); an unreadable
    image fails the run naming the sample, or drops the sample with a warning (`on_bad_image="skip"`); image tokens
    never carry labels."""

    image_token_id: int | None = None
    on_bad_image: Literal["error", "skip"] = "error"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        loaded = [example for example in map(self._load_images, examples) if example is not None]
        if not loaded:
            raise ValueError("Every sample of this batch has an unreadable image.")
        batch = super().torch_call(loaded)
        if self.image_token_id is not None:
            batch["labels"][batch["input_ids"] == self.image_token_id] = -100
        return batch

    def _load_images(self, example: dict[str, Any]) -> dict[str, Any] | None:
        example = dict(example)
        images = example.pop("images") if "images" in example else example.pop("image", None)
        images = [] if images is None else images if isinstance(images, list) else [images]
        try:
            example["images"] = [to_rgb_image(PIL.Image.open(image) if isinstance(image, str) else image)
                                 for image in images]
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            message = f"Sample {example.get('id', '?')!r}: cannot read its image ({error})."
            if self.on_bad_image == "error":
                raise ValueError(message + " Set on_bad_image='skip' to drop such samples.") from error
            logger.warning(message + " Skipped.")
            return None
        return example
