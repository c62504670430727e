"""Publish a CuMo model folder (and optionally its chat Space) to the Hugging Face Hub.

    python -m hub_upload.push MODEL_DIR --repo-id OWNER/NAME [--space] [--private] [--dry-run] [--stage-dir DIR]

The model is staged first: weights, config, processor, tokenizer, chat template and generation config from
MODEL_DIR, the remote-code files fresh from this project's `modeling_cumo/`, and a model card with the Hub metadata
(`pipeline_tag: image-text-to-text`, `library_name: transformers`, `base_model`, `license`, tags) and a usage
snippet. `--space` also stages the Gradio app as a Space (`OWNER/NAME-chat` unless --space-id) serving the model.
`--dry-run` stages and lists what would be uploaded, without any network access.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .folders import copy_remote_code


PROJECT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "model.safetensors", "model.safetensors.index.json")
SPACE_FILES = {"app.py": "space/app.py", "requirements.txt": "space/requirements.txt",
               "examples/shapes.png": "space/examples/shapes.png"}

CARD_TEMPLATE = """---
{card_data}
---

# {model_name}

A [CuMo](https://arxiv.org/abs/2405.05949) vision-language model: {encoder} vision encoder and vision-language
projector with co-upcycled sparse Mixture-of-Experts blocks ({moe}), S2 scales {scales}, and a
`{text_model}` language model ({total} parameters, {activated} activated per token).
Packaged with CuMo-HF as a `transformers` remote-code model: load it with `trust_remote_code=True`
(transformers 5.16.1 or newer: `pip install "transformers>=5.16.1" torch pillow`).

## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

image = Image.new("RGB", (64, 48), "red")  # your image here
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in this picture?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Serve with vLLM

vLLM's Transformers backend serves it (OpenAI-compatible API, images as `image_url` parts), from an environment of
its own (`pip install vllm==0.32.0`):

```bash
vllm serve {repo_id} --trust-remote-code --model-impl transformers \\
  --hf-overrides '{{"auto_map": {{"AutoModel": "modeling_cumo.CuMoModel"}}}}' --dtype bfloat16
```
"""


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def model_card(model_dir: Path, repo_id: str, license: str, base_model: list[str] | None) -> ModelCard:
    config = json.loads((model_dir / "config.json").read_text())
    from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration
    import torch

    with torch.device("meta"):
        model = CuMoForConditionalGeneration(CuMoConfig.from_pretrained(model_dir))
    encoder = "SigLIP" if model.config.vision_config.model_type.startswith("siglip") else "CLIP"
    experts = [f"top-{config.get(f'{m}_num_experts_per_tok')}-of-{config.get(f'{m}_num_experts')} in the {name}"
               for m, name in (("vision", f"{encoder} MLPs"), ("projector", "projector"))
               if config.get(f"{m}_num_experts", 0) > 1]
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model or None,
        tags=["cumo", "mixture-of-experts", "vision-language", "multimodal", "custom_code"],
        model_name=repo_id.split("/")[-1],
    )
    text = CARD_TEMPLATE.format(
        card_data=data.to_yaml(), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        encoder=encoder, moe=", ".join(experts) or "dense blocks", scales=config.get("scales"),
        text_model=config.get("text_config", {}).get("model_type", "?"),
        total=_count(model.num_parameters()), activated=_count(model.num_activated_parameters()),
    )
    return ModelCard(text)


def stage_model(model_dir: Path, stage_dir: Path, repo_id: str, license: str, base_model: list[str] | None) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a model folder (no config.json).")
    if json.loads((model_dir / "config.json").read_text()).get("model_type") != "cumo":
        raise SystemExit(f"{model_dir} is not a CuMo model (model_type is not 'cumo'); convert it with cumo-convert.")
    stage_dir.mkdir(parents=True, exist_ok=True)
    names = set(MODEL_FILES) | {p.name for p in model_dir.glob("model-*.safetensors")}
    for name in sorted(names):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, stage_dir / name)
    if not list(stage_dir.glob("*.safetensors")):
        raise SystemExit(f"{model_dir} holds no safetensors weights.")
    copy_remote_code(stage_dir)
    model_card(model_dir, repo_id, license, base_model).save(stage_dir / "README.md")
    return stage_dir


def stage_space(stage_dir: Path, model_repo_id: str, space_id: str, license: str) -> Path:
    stage_dir.mkdir(parents=True, exist_ok=True)
    for target, source in SPACE_FILES.items():
        (stage_dir / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / source, stage_dir / target)
    import gradio

    _, front, body = (PROJECT / "space" / "README.md").read_text().split("---\n", 2)
    metadata = yaml.safe_load(front)
    metadata.update(sdk_version=gradio.__version__, license=license, models=[model_repo_id],
                    title=f"{space_id.split('/')[-1]}")
    body = body.replace("OWNER/NAME-chat", space_id)
    (stage_dir / "README.md").write_text(f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n{body}")
    return stage_dir


def listing(folder: Path) -> str:
    rows = [f"  {p.relative_to(folder)}  ({p.stat().st_size:,} bytes)" for p in sorted(folder.rglob("*")) if p.is_file()]
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="CuMo model folder (from cumo-convert, cumo-train, cumo-demo)")
    parser.add_argument("--repo-id", required=True, help="model repository, OWNER/NAME")
    parser.add_argument("--space", action="store_true", help="also publish the chat app as a Gradio Space")
    parser.add_argument("--space-id", default=None, help="Space repository (default: OWNER/NAME-chat)")
    parser.add_argument("--private", action="store_true", help="create the repositories as private")
    parser.add_argument("--license", default="apache-2.0", help="license in the metadata (default: apache-2.0)")
    parser.add_argument("--base-model", nargs="*", default=None,
                        help="Hub ids this model derives from, for the card's base_model (e.g. shi-labs/CuMo-mistral-7b)")
    parser.add_argument("--dry-run", action="store_true", help="stage and list the files only; no network")
    parser.add_argument("--stage-dir", type=Path, default=None, help="folder to stage into (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1:
        parser.error("--repo-id must look like OWNER/NAME")
    stage_root = args.stage_dir or Path(tempfile.mkdtemp(prefix="cumo-push-"))
    model_stage = stage_model(args.model_dir, stage_root / "model", args.repo_id, args.license, args.base_model)
    space_id = args.space_id or f"{args.repo_id}-chat"
    space_stage = stage_space(stage_root / "space", args.repo_id, space_id, args.license) if args.space else None
    print(f"Model {args.repo_id} staged in {model_stage}:\n{listing(model_stage)}")
    if space_stage:
        print(f"Space {space_id} staged in {space_stage}:\n{listing(space_stage)}")
    if args.dry_run:
        print("Dry run: nothing uploaded.")
        return
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    api.upload_folder(repo_id=args.repo_id, folder_path=str(model_stage), commit_message="Upload CuMo model")
    print(f"Uploaded https://huggingface.co/{args.repo_id}")
    if space_stage:
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True,
                        space_variables=[{"key": "CUMO_MODEL", "value": args.repo_id}])
        api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(space_stage),
                          commit_message="Upload CuMo chat Space")
        print(f"Uploaded https://huggingface.co/spaces/{space_id}")


if __name__ == "__main__":
    main()
