"""CuMo against its peers, side by side in one run: the vision path, prefill and decode, one training step, batched
chat generation, and memory (weights, and each phase's peak on top of them: on CUDA and on a Linux CPU).

    python benchmarks/model_speed.py --config tiny                      # CPU, seconds
    python benchmarks/model_speed.py --config mid                       # CPU, CLIP 512-wide 8 layers 224px
    python benchmarks/model_speed.py --config proportional              # CPU, the real model's vision/LLM split
    python benchmarks/model_speed.py --config real --device cuda --dtype bfloat16   # CLIP-L/336 + Mistral-7B

Peers: the same CuMo before upcycling (dense), transformers' LlavaForConditionalGeneration with the same LLM and the
same number of image tokens, and the bare LLM decoding a sequence of the same length. Prints a table, writes JSON.
"""

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from transformers import (LlavaConfig, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList, MistralConfig,
                          MistralForCausalLM)

from memory import peak_memory_gib, peak_memory_supported
from timing import timed, timed_in_turns

from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration


CONFIGS = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)),
    "mid": dict(vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                            image_size=224, patch_size=14),
                text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=32000)),
    # the real model's split of work between the vision path and the LLM (vision about a fifth of a training step's
    # FLOPs, as for CLIP-L/336 with S2 [1, 3] and Mistral-7B), at a size a CPU runs in seconds
    "proportional": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                                     image_size=112, patch_size=14),
                         text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                   num_key_value_heads=4, vocab_size=32000)),
    "real": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14),
                 text=dict()),  # Mistral-7B defaults
}


class StepClock(LogitsProcessor):
    """Records the time at which each generation step's logits arrive (prefill first, then one per decoded token)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def build(config_name, device, dtype):
    spec = CONFIGS[config_name]
    torch.manual_seed(0)
    # an id inside the vocabulary: LLaVA embeds its image token before replacing it
    image_token = spec["text"].get("vocab_size", 32000) - 1
    common = dict(vision_config=spec["vision"], text_config=dict(model_type="mistral", **spec["text"]), scales=[1, 3],
                  image_token_id=image_token)
    llava_config = LlavaConfig(vision_config=spec["vision"], text_config=dict(model_type="mistral", **spec["text"]),
                               image_token_id=image_token)
    # each model is built on the device and cast before the next one is built: four fp32 7B models would not fit
    # in host memory, and initialising them on the CPU takes minutes
    with torch.device(device):
        dense = CuMoForConditionalGeneration(CuMoConfig(vision_num_experts=0, projector_num_experts=0, **common))
        moe = CuMoForConditionalGeneration(CuMoConfig(vision_num_experts=0, projector_num_experts=0, **common))
        moe.load_state_dict(dense.state_dict())
        moe.upcycle(4, 2)
        models = {"cumo_moe": moe.to(dtype), "cumo_dense": dense.to(dtype),
                  "llava": LlavaForConditionalGeneration(llava_config).to(dtype),
                  "llm": MistralForCausalLM(MistralConfig(**spec["text"])).to(dtype)}
    return {name: m.eval() for name, m in models.items()}, image_token


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--images", type=int, default=2, help="images in the vision-path and training batches")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time the vision path with both vision towers torch.compile'd (after everything else)")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/model_speed_CONFIG.json)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models, image_token = build(args.config, args.device, dtype)
    moe, dense, llava, llm = (models[k] for k in ("cumo_moe", "cumo_dense", "llava", "llm"))
    size = moe.config.vision_config.image_size
    patches = (size // moe.config.vision_config.patch_size) ** 2
    pixels = torch.randn(args.images, 3, size, size, device=args.device, dtype=dtype)
    results = {}

    # 1. vision path (S2 tower + projector), both stopping at the feature layer; every experts kernel, then the
    # default ("auto", which the rest of the benchmark uses); the paths take turns
    kernels = ("eager", "grouped_mm", "auto")
    with torch.no_grad():
        paths = {f"vision_moe_{name}_s": lambda: moe.get_image_features(pixels) for name in kernels}
        switches = {f"vision_moe_{name}_s": lambda name=name: moe.set_experts_implementation(name) for name in kernels}
        results.update(timed_in_turns({**paths, "vision_dense_s": lambda: dense.get_image_features(pixels)},
                                      args.repeats, args.device, before=switches))
    moe.set_experts_implementation("auto")
    results["vision_moe_over_dense"] = results["vision_moe_auto_s"] / results["vision_dense_s"]

    # 2. prefill (time to first token) and decode, one request with one image
    text = torch.randint(3, 900, (1, 24), device=args.device)
    image_ids = torch.full((1, patches), image_token, device=args.device)
    prompt = torch.cat([text[:, :4], image_ids, text[:, 4:]], dim=1)
    one = pixels[:1]

    def generate(model, new_tokens, **inputs):
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)

    requests_one = {"cumo_moe": (moe, dict(input_ids=prompt, pixel_values=one)),
                    "cumo_dense": (dense, dict(input_ids=prompt, pixel_values=one)),
                    "llava": (llava, dict(input_ids=prompt, pixel_values=one)),
                    "llm": (llm, dict(input_ids=torch.randint(3, 900, prompt.shape, device=args.device)))}
    steps = {name: [] for name in requests_one}  # per repeat, the median decode step of each model
    with torch.no_grad():
        for name, (model, inputs) in requests_one.items():
            results[f"prefill_{name}_s"] = timed(lambda: generate(model, 1, **inputs), args.repeats, args.device)
        # decode speed from per-step timestamps (prefill and stalls stay out of it), the models taking turns so that
        # a slow spell of a shared machine falls on all of them alike
        for _ in range(args.repeats):
            for name, (model, inputs) in requests_one.items():
                clock = StepClock(args.device)
                generate(model, args.new_tokens, logits_processor=LogitsProcessorList([clock]), **inputs)
                steps[name].append(statistics.median(b - a for a, b in zip(clock.times, clock.times[1:])))
    for name, medians in steps.items():  # the fastest run: a shared machine's noise only ever slows a run down
        results[f"decode_{name}_tokens_per_s"] = 1 / min(medians)
    results["decode_cumo_over_llm"] = results["decode_cumo_moe_tokens_per_s"] / results["decode_llm_tokens_per_s"]

    # 3. one training step (forward + backward) of the vit stage against the dense model, taking turns
    batch = torch.cat([prompt] * args.images)

    def training_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, pixel_values=pixels, labels=batch).loss.backward()
        return run

    def free_gradients():  # untimed, before each step: two 7B models' gradients need not share the GPU
        moe.zero_grad(set_to_none=True), dense.zero_grad(set_to_none=True)

    moe.train(), dense.train()
    results.update(timed_in_turns({"train_step_moe_s": training_step(moe), "train_step_dense_s": training_step(dense)},
                                  args.repeats, args.device,
                                  before={"train_step_moe_s": free_gradients, "train_step_dense_s": free_gradients}))
    for model in (moe, dense):
        model.zero_grad(set_to_none=True)  # the gradients of a 7B model would stay on the GPU
        model.eval()
    results["train_moe_over_dense"] = results["train_step_moe_s"] / results["train_step_dense_s"]

    # 4. eight chat requests, batched against one by one
    requests = [torch.cat([torch.randint(3, 900, (1, 4 + i), device=args.device), image_ids, text[:, 4:]], 1)
                for i in range(8)]
    width = max(r.shape[1] for r in requests)
    padded = torch.zeros(8, width, dtype=torch.long, device=args.device)
    mask = torch.zeros_like(padded)
    for i, r in enumerate(requests):  # left padding
        padded[i, width - r.shape[1]:], mask[i, width - r.shape[1]:] = r[0], 1
    eight = pixels[:1].expand(8, -1, -1, -1).contiguous()
    with torch.no_grad():
        one_by_one = timed(lambda: [generate(moe, args.new_tokens, input_ids=r, pixel_values=one) for r in requests],
                           1, args.device)
        batched = timed(lambda: generate(moe, args.new_tokens, input_ids=padded, attention_mask=mask,
                                         pixel_values=eight), 1, args.device)
    results["chat8_one_by_one_s"], results["chat8_batched_s"] = one_by_one, batched
    results["chat8_batched_speedup"] = one_by_one / batched

    # 5. memory: each model's weights, and the peak each phase needs on top of them (activations, KV cache, gradients)
    if peak_memory_supported(args.device):
        for name, model in models.items():
            results[f"weights_{name}_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        with torch.no_grad():
            for name, model in (("cumo_moe", moe), ("cumo_dense", dense)):
                results[f"peak_memory_vision_{name}_gib"] = peak_memory_gib(lambda: model.get_image_features(pixels),
                                                                            args.device)
            for name, (model, inputs) in requests_one.items():
                results[f"peak_memory_generate_{name}_gib"] = peak_memory_gib(
                    lambda: generate(model, args.new_tokens, **inputs), args.device)
        for name, model in (("cumo_moe", moe), ("cumo_dense", dense)):
            model.train()
            model.zero_grad(set_to_none=True)
            results[f"peak_memory_train_step_{name}_gib"] = peak_memory_gib(training_step(model), args.device)
            model.zero_grad(set_to_none=True)
            model.eval()

    if args.compile:  # 6. (last: compiling changes the models) the vision path with torch.compile'd towers
        with torch.no_grad():
            eager_features = moe.get_image_features(pixels).pooler_output
            start = time.perf_counter()
            for model in (moe, dense):
                model.model.vision_tower.compile()
                model.get_image_features(pixels)  # compiles
            results["compile_s"] = time.perf_counter() - start
            results["compiled_max_abs_diff"] = (moe.get_image_features(pixels).pooler_output - eager_features).abs().max().item()
            results["vision_moe_compiled_s"] = timed(lambda: moe.get_image_features(pixels), args.repeats, args.device)
            results["vision_dense_compiled_s"] = timed(lambda: dense.get_image_features(pixels), args.repeats, args.device)
        results["vision_moe_compiled_over_dense_compiled"] = results["vision_moe_compiled_s"] / results["vision_dense_compiled_s"]
        results["vision_moe_compile_speedup"] = results["vision_moe_auto_s"] / results["vision_moe_compiled_s"]

    print(f"config {args.config}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.images} images x {patches} patches, S2 [1, 3], top-2-of-4 MoE")
    for key, value in results.items():
        print(f"  {key:<36} {value:.4g}" if isinstance(value, float) else f"  {key:<36} {value}")
    output = args.output or f"benchmarks/model_speed_{args.config}.json"
    with open(output, "w") as f:
        json.dump({"args": vars(args), "date": str(date.today()), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "results": results}, f, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
