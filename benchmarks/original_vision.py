"""Our vision path (S2 tower + projector) against the original implementation's, with the same weights.

The project does not include the original code: point this script to a checkout of it (it needs `einops`).

    git clone https://github.com/SHI-Labs/CuMo /somewhere/CuMo && pip install einops
    python benchmarks/original_vision.py --original-source /somewhere/CuMo
    python benchmarks/original_vision.py --original-source /somewhere/CuMo --device cuda --dtype bfloat16

Both sides get the same random CLIP and projector weights (the original's modules are built, then loaded into CuMo
through the converter's own weight mapping), and the outputs are compared before anything is timed. Measured:
inference (no_grad) and one forward + backward, MoE top-2-of-4 and dense, for the original and for us.
"""

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig

from timing import timed_in_turns

from hub_upload.convert_original import apply_original_weights
from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration


def original_modules(source: Path, vision: CLIPVisionConfig, text_hidden: int, scales: list[int], moe: bool, folder: Path):
    """The original's CLIPVisionTower and projector, built from its source as its training script builds them."""
    sys.path.insert(0, str(source))
    from cumo.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from cumo.model.multimodal_projector.builder import build_vision_projector

    vision.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": vision.image_size},
                       crop_size={"height": vision.image_size, "width": vision.image_size}).save_pretrained(folder)
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch", clip_smoe=moe, scales=scales,
                           num_experts=4, num_selected=2, mm_projector_type="smoe_mlp" if moe else "mlp2x_gelu",
                           mm_hidden_size=vision.hidden_size, hidden_size=text_hidden, num_layers=2, dropout=False)
    return CLIPVisionTower(str(folder), args), build_vision_projector(args)


def original_path(tower, projector, pixels):
    features, balance, z = tower(pixels)
    projected = projector(features)
    return projected[0] if isinstance(projected, tuple) else projected


def ours_from(tower, projector, vision: CLIPVisionConfig, text_hidden: int, scales: list[int], moe: bool, folder: Path):
    config = CuMoConfig(vision_config=vision.to_dict(), scales=scales,
                        text_config=dict(model_type="mistral", hidden_size=text_hidden, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         vocab_size=64),
                        vision_num_experts=4 if moe else 0, projector_num_experts=4 if moe else 0)
    model = CuMoForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    path = folder / "original.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    apply_original_weights(model, [path])
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-source", type=Path, required=True, help="a checkout of the original CuMo code")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--width", type=int, default=512, help="CLIP hidden size (intermediate is 4x)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/original_vision.json")
    args = parser.parse_args(argv)
    if not (args.original_source / "cumo" / "model" / "multimodal_encoder" / "clip_encoder.py").is_file():
        parser.error(f"{args.original_source} is not a checkout of the original CuMo (no cumo/model/multimodal_encoder)")
    dtype = getattr(torch, args.dtype)
    vision = CLIPVisionConfig(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                              num_attention_heads=args.width // 64, image_size=args.image_size, patch_size=14)
    scales, text_hidden = [1, 3], args.width
    torch.manual_seed(0)
    pixels = torch.randn(args.images, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    results = {}
    for moe in (True, False):
        kind = "moe" if moe else "dense"
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            tower, projector = original_modules(args.original_source, vision, text_hidden, scales, moe, Path(tmp))
            for module in (tower, projector):
                module.to(args.device, dtype).eval()
            ours = ours_from(tower, projector, vision, text_hidden, scales, moe, Path(tmp)).to(args.device, dtype).eval()
        with torch.no_grad():
            theirs_out = original_path(tower, projector, pixels).float()
            ours_out = ours.get_image_features(pixels).pooler_output.float()
            results[f"{kind}_max_abs_difference"] = (theirs_out - ours_out).abs().max().item()
            results.update(timed_in_turns({f"original_{kind}_inference_s": lambda: original_path(tower, projector, pixels),
                                           f"ours_{kind}_inference_s": lambda: ours.get_image_features(pixels)},
                                          args.repeats, args.device))

        def train_step(fn, modules):
            for module in modules:
                module.zero_grad(set_to_none=True)
            fn().float().square().mean().backward()

        for module in (tower, projector, ours):
            module.train()
        results.update(timed_in_turns({  # the two take turns: a slow spell of the machine falls on both
            f"original_{kind}_train_step_s": lambda: train_step(lambda: original_path(tower, projector, pixels),
                                                                [tower, projector]),
            f"ours_{kind}_train_step_s": lambda: train_step(
                lambda: ours.get_image_features(pixels, compute_router_losses=True).pooler_output, [ours]),
        }, args.repeats, args.device))
    for mode in ("inference", "train_step"):
        results[f"{mode}_ours_over_original_moe"] = results[f"ours_moe_{mode}_s"] / results[f"original_moe_{mode}_s"]
        results[f"{mode}_original_moe_over_original_dense"] = results[f"original_moe_{mode}_s"] / results[f"original_dense_{mode}_s"]
        results[f"{mode}_original_moe_over_ours_dense"] = results[f"original_moe_{mode}_s"] / results[f"ours_dense_{mode}_s"]
        results[f"{mode}_ours_moe_over_ours_dense"] = results[f"ours_moe_{mode}_s"] / results[f"ours_dense_{mode}_s"]

    print(f"vision path: CLIP {args.width}-wide, {args.layers} layers, {args.image_size}px, S2 {scales}, "
          f"{args.images} images, top-2-of-4; {args.device} {args.dtype}, {torch.get_num_threads()} threads")
    for key, value in results.items():
        print(f"  {key:<48} {value:.4g}")
    with open(args.output, "w") as f:
        json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "date": str(date.today()),
                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "results": results}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
