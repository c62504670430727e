"""Peak memory of `cumo-convert` on a multi-shard synthetic original checkpoint.

Writes a random-weight checkpoint in the original CuMo format (real CLIP ViT-L/14-336 MoE sizes, MoE projector, a
Mistral-shaped LM of configurable size), split into shards with every expert bank spread over several shards,
then converts it in a child process and reports the child's peak resident memory against the largest shard.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


DATA = Path(__file__).parent.parent / "tests" / "data" / "original_ckpt"


def original_shapes(clip_layers, experts, hidden, layers, intermediate, vocab, scales):
    clip, clip_mlp, patches = 1024, 4096, 577
    shapes = {
        "model.vision_tower.vision_model.embeddings.class_embedding": (clip,),
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight": (clip, 3, 14, 14),
        "model.vision_tower.vision_model.embeddings.position_embedding.weight": (patches, clip),
        "model.vision_tower.vision_model.pre_layrnorm.weight": (clip,),
        "model.vision_tower.vision_model.pre_layrnorm.bias": (clip,),
    }
    for layer in range(clip_layers):
        prefix = f"model.vision_tower.vision_model.encoder.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{prefix}self_attn.{proj}.weight"] = (clip, clip)
            shapes[f"{prefix}self_attn.{proj}.bias"] = (clip,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{prefix}{norm}.weight"] = shapes[f"{prefix}{norm}.bias"] = (clip,)
        shapes[f"{prefix}gate.weight"] = (experts, clip)
        for e in range(experts):
            shapes[f"{prefix}experts.{e}.fc1.weight"], shapes[f"{prefix}experts.{e}.fc1.bias"] = (clip_mlp, clip), (clip_mlp,)
            shapes[f"{prefix}experts.{e}.fc2.weight"], shapes[f"{prefix}experts.{e}.fc2.bias"] = (clip, clip_mlp), (clip,)
    shapes["model.mm_projector.gate.weight"] = (experts, clip * len(scales))
    for e in range(experts):
        shapes[f"model.mm_projector.experts.{e}.0.weight"] = (hidden, clip * len(scales))
        shapes[f"model.mm_projector.experts.{e}.0.bias"] = (hidden,)
        shapes[f"model.mm_projector.experts.{e}.2.weight"] = (hidden, hidden)
        shapes[f"model.mm_projector.experts.{e}.2.bias"] = (hidden,)
    shapes["model.embed_tokens.weight"] = shapes["lm_head.weight"] = (vocab, hidden)
    shapes["model.norm.weight"] = (hidden,)
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{prefix}mlp.gate_proj.weight"] = shapes[f"{prefix}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}input_layernorm.weight"] = shapes[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_checkpoint(folder: Path, shapes: dict, shards: int, dtype: torch.dtype, args) -> list[int]:
    folder.mkdir(parents=True)
    keys = list(shapes)
    parts = [keys[i::shards] for i in range(shards)]  # round robin: each expert bank spans several shards
    weight_map, sizes = {}, []
    for number, part in enumerate(parts, start=1):
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        tensors = {k: torch.randn(shapes[k], dtype=torch.float32).to(dtype) * 0.02 for k in part}
        save_file(tensors, folder / name)
        sizes.append((folder / name).stat().st_size)
        weight_map.update(dict.fromkeys(part, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((DATA / "config.json").read_text())
    config.update(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                  vocab_size=args.vocab, num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
                  mm_hidden_size=1024, mm_vision_tower="openai/clip-vit-large-patch14-336", num_experts=args.experts,
                  torch_dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / name, folder / name)
    clip = folder.parent / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": args.clip_layers, "num_attention_heads": 16,
        "image_size": 336, "patch_size": 14}))
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048, help="LM hidden size")
    parser.add_argument("--layers", type=int, default=8, help="LM layers")
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=384, help="LM vocabulary (the tokenizer's is 384)")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--max-shard-size", default="500MB", help="the converter's output shard size")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--output", default="benchmarks/convert_memory.json")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="cumo-convert-bench-"))
    try:
        shapes = original_shapes(args.clip_layers, args.experts, args.hidden, args.layers, args.intermediate,
                                 args.vocab, [1, 3])
        sizes = write_checkpoint(work / "ckpt", shapes, args.shards, dtype, args)
        command = [sys.executable, "-m", "hub_upload.convert_original", "--input", str(work / "ckpt"),
                   "--output", str(work / "converted"), "--vision-tower", str(work / "clip"),
                   "--max-shard-size", args.max_shard_size]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        result = {
            "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
            "checkpoint_bytes": sum(sizes), "shards": args.shards, "largest_shard_bytes": max(sizes),
            "peak_rss_bytes": peak, "dtype": args.dtype, "max_shard_size": args.max_shard_size,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = 1024**3
    print(f"checkpoint {result['checkpoint_bytes'] / gb:.2f} GiB in {args.shards} shards "
          f"(largest {result['largest_shard_bytes'] / gb:.2f} GiB), {result['parameters'] / 1e9:.2f}B parameters")
    print(f"converter output shards of at most {args.max_shard_size}")
    print(f"converter peak RSS {result['peak_rss_bytes'] / gb:.2f} GiB "
          f"({result['peak_rss_bytes'] / result['checkpoint_bytes']:.2f}x the checkpoint, "
          f"{result['peak_rss_bytes'] / result['largest_shard_bytes']:.2f}x the largest shard)")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
