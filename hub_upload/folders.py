"""What every writer of a CuMo folder shares: the remote-code files, and the image processor of a CLIP or SigLIP
folder."""

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


# SigLIP's own normalisation (transformers' SiglipImageProcessor defaults), for a folder without a preprocessor config
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def image_processor_for(encoder: str | Path | None, image_size: int, model_type: str = "clip_vision_model"):
    """CuMo's image processor at `image_size` for the CLIP or SigLIP (`model_type` "siglip_vision_model") folder or
    Hub id `encoder`, with the mean and std of its `preprocessor_config.json` if it has one. Images are padded to a
    square with the mean colour first, as LLaVA-style models do; then CLIP's shortest-edge resize and centre crop, or
    SigLIP's own resize straight to the square size (with its resampling, when its config names one)."""
    siglip = model_type == "siglip_vision_model"
    path = None if encoder is None else cached_file(str(encoder), "preprocessor_config.json",
                                                      _raise_exceptions_for_missing_entries=False)
    settings = json.loads(Path(path).read_text()) if path is not None else {}
    kwargs = {"resample": settings["resample"]} if siglip and "resample" in settings else {}
    return make_image_processor(
        image_size,
        image_mean=settings.get("image_mean", SIGLIP_MEAN if siglip else None),
        image_std=settings.get("image_std", SIGLIP_STD if siglip else None),
        crop=not siglip,
        **kwargs,
    )
