"""Convert a checkpoint of the original CuMo project (LLaVA-derived `llava_mistral` / `llava_mixtral` format, as
`shi-labs/CuMo-mistral-7b` and `shi-labs/CuMo-mixtral-8x7b` ship) into a Hub-ready CuMo-HF folder that loads with
`AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)`.

Weights are read one tensor at a time and written in output shards (peak memory is about one output shard,
--max-shard-size). Pickled `.bin` weights are refused
unless --allow-pickle is given (then loaded with `weights_only=True`). The output appears only when complete.

With --base, the inputs are instead the weight files the original training saves on their own (`mm_projector.bin`
after pre-training, `clip.bin`), loaded into a copy of a CuMo-HF folder, so that a stage-1/2 checkpoint of the
original project can continue in this project's trainer.
"""

import argparse
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CONFIG_MAPPING, CLIPVisionConfig, GenerationConfig

from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration, CuMoProcessor

from .folders import copy_remote_code, image_processor_for
from .sentencepiece_tokenizer import original_tokenizer


TEXT_MODEL_TYPES = {"llava_mistral": "mistral", "llava_mixtral": "mixtral"}
# Fields of the original config that describe the multimodal wrapper or training, not the language model.
WRAPPER_FIELDS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "mm_vision_tower", "mm_hidden_size",
    "scales", "mm_projector_type", "num_experts", "num_selected", "clip_smoe", "mlp_smoe", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_patch_merge_type", "image_aspect_ratio", "mm_use_im_start_end",
    "mm_use_im_patch_token", "tokenizer_padding_side", "tokenizer_model_max_length", "balance_loss_coef",
    "router_z_loss_coef", "training", "local_rank", "use_mm_proj", "num_layers", "dropout", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "mm_projector_lr", "image_grid_pinpoints", "mm_vision_tower_lr", "unfreeze_mm_vision_tower",
}
# The standard CLIP ViT-L/14-336 (`openai/clip-vit-large-patch14-336`), used when no tower config can be found.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)

_CLIP_EXPERT = re.compile(r"^model\.vision_tower\.vision_model\.(encoder\.layers\.\d+)\.experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")
_CLIP_ROUTER = re.compile(r"^model\.vision_tower\.vision_model\.(encoder\.layers\.\d+)\.gate\.weight$")
_PROJECTOR_EXPERT = re.compile(r"^model\.mm_projector\.experts\.(\d+)\.(0|2)\.(weight|bias)$")
_PROJECTOR_DENSE = re.compile(r"^model\.mm_projector\.(0|2)\.(weight|bias)$")


class ConversionError(ValueError):
    """The input is not an original CuMo checkpoint this converter understands."""


def build_config(original: dict, vision_config: CLIPVisionConfig, image_token_id: int) -> CuMoConfig:
    model_type = original.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {model_type!r}; expected one of {sorted(TEXT_MODEL_TYPES)} (an original CuMo "
            "checkpoint)."
        )
    text_fields = {k: v for k, v in original.items() if k not in WRAPPER_FIELDS}
    text_config = CONFIG_MAPPING[TEXT_MODEL_TYPES[model_type]].from_dict(text_fields)
    if original.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ConversionError(
            f"The vision tower config has hidden size {vision_config.hidden_size} but the checkpoint was trained with "
            f"mm_hidden_size {original['mm_hidden_size']}: point --vision-tower at the right CLIP config."
        )
    projector_type = original.get("mm_projector_type", "smoe_mlp")
    if projector_type not in ("smoe_mlp", "mlp2x_gelu"):
        raise ConversionError(f"mm_projector_type {projector_type!r} is not supported (smoe_mlp or mlp2x_gelu).")
    num_experts, top_k = original.get("num_experts", 4), original.get("num_selected", 2)
    return CuMoConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        scales=original.get("scales") or [1],
        vision_feature_layer=-2,  # what the original computes, whatever mm_vision_select_layer says
        vision_num_experts=num_experts if original.get("clip_smoe") else 0,
        vision_num_experts_per_tok=top_k,
        projector_num_experts=num_experts if projector_type == "smoe_mlp" else 0,
        projector_num_experts_per_tok=top_k,
        balance_loss_coef=original.get("balance_loss_coef", 0.1),
        router_z_loss_coef=original.get("router_z_loss_coef", 0.01),
        tie_word_embeddings=original.get("tie_word_embeddings", False),
    )


def find_vision_tower(input_dir: Path, name: str | None, override: Path | None) -> tuple[Path | None, str]:
    """The CLIP folder: --vision-tower, else `mm_vision_tower` relative to the current folder or the checkpoint's
    parent folder (as the original resolves it)."""
    if override is not None:
        if not (override / "config.json").is_file():
            raise ConversionError(f"--vision-tower {override} has no config.json.")
        return override, str(override)
    for base in (Path.cwd(), input_dir.parent, input_dir):
        if name and (base / name / "config.json").is_file():
            return base / name, name
    return None, name or "(none)"


def load_vision_config(folder: Path | None, name: str) -> CLIPVisionConfig:
    if folder is None:
        warnings.warn(
            f"No CLIP config found for mm_vision_tower {name!r} (pass --vision-tower DIR); using the standard CLIP "
            "ViT-L/14-336 numbers.",
            stacklevel=2,
        )
        return CLIPVisionConfig(**CLIP_L_336)
    data = json.loads((folder / "config.json").read_text())
    if data.get("model_type") == "clip":
        data = data.get("vision_config") or {}
    elif data.get("model_type") not in (None, "clip_vision_model"):
        raise ConversionError(f"{folder}/config.json is a {data.get('model_type')!r} config, not a CLIP one.")
    return CLIPVisionConfig.from_dict({k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})


def weight_files(input_dir: Path, allow_pickle: bool) -> list[Path]:
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = input_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        files = [p.name for p in sorted(input_dir.glob("*.safetensors"))]
        pickled = not files
        if pickled:
            files = [p.name for p in sorted(input_dir.glob("pytorch_model*.bin"))]
    if not files:
        raise ConversionError(f"{input_dir} holds no weights (*.safetensors or pytorch_model*.bin).")
    if pickled and not allow_pickle:
        raise ConversionError(
            f"{input_dir} stores its weights as pickled .bin files, which can run code when loaded. Convert them only "
            "if you trust their source, with --allow-pickle (they are then loaded with weights_only=True)."
        )
    missing = [name for name in files if not (input_dir / name).is_file()]
    if missing:
        raise ConversionError(f"Weight files named in the index are missing: {missing}")
    return [input_dir / name for name in files]


class WeightSource:
    """Reads single tensors from the input files without loading whole shards: safetensors are read per tensor,
    pickled `.bin` files are memory-mapped (`weights_only=True`)."""

    def __init__(self, files: list[Path]):
        self.location: dict[str, Path] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files:
            try:
                if path.suffix == ".safetensors":
                    with safe_open(path, framework="pt") as f:
                        keys = list(f.keys())
                else:
                    self._pickled[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    keys = list(self._pickled[path])
            except Exception as error:  # safetensors, pickle and zip raise their own kinds for a damaged file
                raise ConversionError(f"{path.name} is truncated or corrupt ({error}); download it again.") from error
            self.location.update(dict.fromkeys(keys, path))

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self.location[key]
        try:
            if path in self._pickled:
                return self._pickled[path][key]
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key)
        except Exception as error:
            raise ConversionError(f"{path.name}: cannot read {key} ({error}); the file is truncated or corrupt.") \
                from error

    def shape(self, key: str) -> tuple[int, ...]:
        path = self.location[key]
        if path in self._pickled:
            return tuple(self._pickled[path][key].shape)
        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())


def target_name(key: str) -> tuple[str, int | None]:
    """The CuMo-HF name of an original weight, and its expert index when it is one expert of a fused bank."""
    if match := _CLIP_EXPERT.match(key):
        layer, expert, linear, kind = match.groups()
        name = f"model.vision_tower.{layer}.mlp.experts.{'up_proj' if linear == 'fc1' else 'down_proj'}"
        return name + ("_bias" if kind == "bias" else ""), int(expert)
    if match := _CLIP_ROUTER.match(key):
        return f"model.vision_tower.{match.group(1)}.mlp.gate.weight", None
    if key.startswith("model.vision_tower.vision_model."):
        return "model.vision_tower." + key.removeprefix("model.vision_tower.vision_model."), None
    if match := _PROJECTOR_EXPERT.match(key):
        expert, linear, kind = match.groups()
        name = f"model.multi_modal_projector.experts.{'up_proj' if linear == '0' else 'down_proj'}"
        return name + ("_bias" if kind == "bias" else ""), int(expert)
    if key == "model.mm_projector.gate.weight":
        return "model.multi_modal_projector.gate.weight", None
    if match := _PROJECTOR_DENSE.match(key):
        linear, kind = match.groups()
        return f"model.multi_modal_projector.linear_{1 if linear == '0' else 2}.{kind}", None
    if key.startswith("model.mm_projector.") or key.startswith("model.vision_tower."):
        raise ConversionError(f"Unrecognised multimodal weight {key!r}.")
    if key.startswith("model."):
        # The language model keeps its own names (Mixtral's per-expert w1/w2/w3 included: transformers fuses them
        # on load, and writes them back this way on save).
        return "model.language_model." + key.removeprefix("model."), None
    if key == "lm_head.weight":
        return key, None
    raise ConversionError(f"Unrecognised weight {key!r}.")


def plan_outputs(keys: list[str], num_experts: int) -> dict[str, list[str]]:
    """Output name -> the input keys it is made of (one, or one per expert in expert order), in input order."""
    plan: dict[str, dict[int | None, str]] = {}
    for key in keys:
        name, expert = target_name(key)
        if expert is not None and not 0 <= expert < num_experts:
            raise ConversionError(f"{key}: expert {expert} but the config says num_experts={num_experts}.")
        plan.setdefault(name, {})[expert] = key
    for name, parts in plan.items():
        if None not in parts and sorted(parts) != list(range(num_experts)):
            raise ConversionError(f"{name}: only experts {sorted(parts)} of {num_experts} are in the checkpoint.")
    return {name: [parts[e] for e in sorted(parts, key=lambda e: -1 if e is None else e)] for name, parts in plan.items()}


def check_shapes(source: "WeightSource", plan: dict[str, list[str]], config: CuMoConfig) -> None:
    """Every weight against the shape the config gives it (built on the meta device), before anything is written:
    a checkpoint whose tensors disagree with its config.json would otherwise convert and fail only when loaded."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in CuMoForConditionalGeneration(config).state_dict().items()}
    wrong = []
    for name, keys in plan.items():
        shape = source.shape(keys[0])
        if len(keys) > 1 or target_name(keys[0])[1] is not None:
            shape = (len(keys), *shape)
        if name in expected and shape != expected[name]:
            wrong.append(f"{name} is {list(shape)}, the config gives {list(expected[name])}")
    if wrong:
        raise ConversionError(f"{len(wrong)} weights do not match config.json: " + "; ".join(wrong[:5])
                              + (" ..." if len(wrong) > 5 else ""))


def convert_weights(files: list[Path], output: Path, config: CuMoConfig, dtype: torch.dtype | None,
                    max_shard_bytes: int) -> None:
    """Write the converted weights in shards of at most `max_shard_bytes`; memory holds about one output shard."""
    source = WeightSource(files)
    plan = plan_outputs(list(source.location), max(config.vision_num_experts, config.projector_num_experts, 1))
    check_shapes(source, plan, config)
    shards, shard, shard_bytes = [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            path = output / f"shard-{len(shards):05d}.safetensors"
            save_file(shard, path, metadata={"format": "pt"})
            shards.append((path, list(shard), shard_bytes))
            shard, shard_bytes = {}, 0

    for name, keys in tqdm(plan.items(), desc="Converting weights", unit="tensor"):
        tensors = [source[key] for key in keys]
        tensor = torch.stack(tensors) if len(tensors) > 1 or target_name(keys[0])[1] is not None else tensors[0]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
    flush()

    if len(shards) == 1:
        shards[0][0].rename(output / "model.safetensors")
        return
    weight_map = {}
    for number, (path, names, _) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        path.rename(output / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(size for _, _, size in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert(input_dir: Path, output_dir: Path, vision_tower: Path | None = None, allow_pickle: bool = False,
            dtype: str | None = None, max_shard_size: str = "5GB") -> Path:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    config_file = input_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{input_dir} has no config.json: not a checkpoint folder.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConversionError(f"{output_dir} exists and is not empty; choose a new output folder.")
    original = json.loads(config_file.read_text())
    if original.get("model_type") not in TEXT_MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {original.get('model_type')!r}; expected one of {sorted(TEXT_MODEL_TYPES)}."
        )
    files = weight_files(input_dir, allow_pickle)
    tower_dir, tower_name = find_vision_tower(input_dir, original.get("mm_vision_tower"), vision_tower)
    vision_config = load_vision_config(tower_dir, tower_name)

    try:
        tokenizer = original_tokenizer(input_dir)
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read the original tokenizer: {error}") from error
    config = build_config(original, vision_config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    config.dtype = dtype or original.get("torch_dtype") or "float32"
    processor = CuMoProcessor(image_processor_for(tower_dir, vision_config.image_size), tokenizer,
                              patch_size=vision_config.patch_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*"):  # left by an interrupted conversion
        print(f"Removing {stale}, left by an interrupted conversion.")
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        convert_weights(files, staging, config, getattr(torch, dtype) if dtype else None, parse_size(max_shard_size))
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        generation = GenerationConfig.from_pretrained(input_dir) if (input_dir / "generation_config.json").is_file() \
            else GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(staging)
        copy_remote_code(staging)
        saved = json.loads((staging / "config.json").read_text())
        saved["auto_map"] = {
            "AutoConfig": "configuration_cumo.CuMoConfig",
            "AutoModel": "modeling_cumo.CuMoForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_cumo.CuMoForConditionalGeneration",
        }
        (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        _set_default_permissions(staging)
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


_PARTIAL_PREFIXES = {
    "model.mm_projector.": "model.mm_projector.",
    "mm_projector.": "model.mm_projector.",
    "model.vision_tower.vision_model.": "model.vision_tower.vision_model.",
    "vision_tower.vision_model.": "model.vision_tower.vision_model.",
    "model.vision_tower.": "model.vision_tower.vision_model.",
    "vision_tower.": "model.vision_tower.vision_model.",
    "vision_model.": "model.vision_tower.vision_model.",
}


def _original_partial_key(key: str) -> str:
    for prefix, replacement in _PARTIAL_PREFIXES.items():
        if key.startswith(prefix):
            return replacement + key.removeprefix(prefix)
    raise ConversionError(f"{key!r} is neither a projector nor a vision tower weight.")


def apply_original_weights(model, files: list[Path]) -> list[str]:
    """Load the projector / vision tower weights that the original training saves on their own (`mm_projector.bin`
    after pre-training, `clip.bin`) into a CuMo model, e.g. one made by `cumo-init`. Returns the names loaded."""
    source = WeightSource(files)
    originals = {_original_partial_key(key): key for key in source.location}
    experts = [target_name(key)[1] for key in originals]
    num_experts = max([e for e in experts if e is not None], default=0) + 1
    state = model.state_dict()
    updates = {}
    for name, keys in plan_outputs(list(originals), num_experts).items():
        tensors = [source[originals[key]] for key in keys]
        tensor = torch.stack(tensors) if target_name(keys[0])[1] is not None else tensors[0]
        if name not in state:
            kind = "an MoE" if target_name(keys[0])[1] is not None or name.endswith("gate.weight") else "a dense"
            raise ConversionError(
                f"{name} (from {source.location[originals[keys[0]]].name}) does not exist in the model: the file holds "
                f"{kind} block; upcycle the model or build it with matching MoE settings first."
            )
        if tensor.shape != state[name].shape:
            raise ConversionError(f"{name}: the file has shape {tuple(tensor.shape)}, the model {tuple(state[name].shape)}.")
        updates[name] = tensor.to(state[name].dtype)
    model.load_state_dict(updates, strict=False)
    return sorted(updates)


def convert_partial(files: list[Path], base: Path, output_dir: Path) -> Path:
    """A copy of the CuMo folder `base` with the original's projector / vision tower weight files loaded into it."""
    from modeling_cumo import CuMoForConditionalGeneration

    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConversionError(f"{output_dir} exists and is not empty; choose a new output folder.")
    model = CuMoForConditionalGeneration.from_pretrained(base)
    apply_original_weights(model, files)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*"):  # left by an interrupted conversion
        print(f"Removing {stale}, left by an interrupted conversion.")
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        weights = re.compile(r"^(model.*\.safetensors|.*\.index\.json|pytorch_model.*\.bin)$")
        for path in Path(base).iterdir():
            if path.is_file() and not weights.match(path.name):
                shutil.copy(path, staging / path.name)
        model.save_pretrained(staging)
        _set_default_permissions(staging)
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9 (also KB, MB, GiB, MiB; a bare number is bytes)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.I)
    if not match:
        raise ConversionError(f"Cannot read the size {size!r}; write it like 5GB or 500MB.")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, None: 1}
    return int(float(match.group(1)) * units[match.group(2).lower() if match.group(2) else None])


def _set_default_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder; give the result the permissions any new folder would get."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, nargs="+",
                        help="original checkpoint folder (config.json with model_type llava_mistral/llava_mixtral, "
                             "weights, tokenizer); with --base: the original training's mm_projector.bin / clip.bin")
    parser.add_argument("--base", type=Path, default=None,
                        help="a CuMo-HF folder (e.g. from cumo-init) into which the --input weight files are loaded")
    parser.add_argument("--output", type=Path, required=True, help="new folder for the converted model")
    parser.add_argument("--vision-tower", type=Path, default=None,
                        help="CLIP folder with config.json (a CLIPVisionConfig or full CLIPConfig); default: the "
                             "checkpoint's mm_vision_tower, found from the current folder or the checkpoint's parent")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled .bin weights (loaded with weights_only=True); only for trusted files")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="store the weights in this dtype (default: as they are)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest output shard, e.g. 5GB or 500MB (default 5GB); memory use is about one shard")
    args = parser.parse_args(argv)
    try:
        if args.base is not None:
            pickled = [f for f in args.input if f.suffix != ".safetensors"]
            if pickled and not args.allow_pickle:
                raise ConversionError(f"{pickled[0]} is a pickle file; add --allow-pickle if you trust its source.")
            output = convert_partial(args.input, args.base, args.output)
        elif len(args.input) != 1:
            raise ConversionError("Give one checkpoint folder as --input (several files only with --base).")
        else:
            output = convert(args.input[0], args.output, args.vision_tower, args.allow_pickle, args.dtype,
                             args.max_shard_size)
    except ConversionError as error:
        parser.exit(2, f"cumo-convert: error: {error}\n")
    print(f"Converted {' '.join(map(str, args.input))} -> {output}")


if __name__ == "__main__":
    main()
