"""What every writer of a CuMo folder shares: the remote-code files, and the image processor of a CLIP folder."""

import json
import shutil
from pathlib import Path

from transformers.utils import cached_file

import modeling_cumo
from modeling_cumo.processing_cumo import make_image_processor


REMOTE_CODE_FILES = ("configuration_cumo.py", "modeling_cumo.py", "moe_cumo.py", "vision_cumo.py", "processing_cumo.py")


def copy_remote_code(folder: Path) -> None:
    """Copy this project's `modeling_cumo/` files next to the weights, for `trust_remote_code=True`."""
    package = Path(modeling_cumo.__file__).parent
    for name in REMOTE_CODE_FILES:
        shutil.copy2(package / name, Path(folder) / name)


def image_processor_for(clip: str | Path | None, image_size: int):
    """CuMo's image processor at `image_size`, with the mean and std of the CLIP folder or Hub id `clip`, if it has a
    `preprocessor_config.json`."""
    processor = make_image_processor(image_size)
    path = None if clip is None else cached_file(str(clip), "preprocessor_config.json",
                                                   _raise_exceptions_for_missing_entries=False)
    if path is not None:
        settings = json.loads(Path(path).read_text())
        processor.image_mean = settings.get("image_mean", processor.image_mean)
        processor.image_std = settings.get("image_std", processor.image_std)
    return processor
