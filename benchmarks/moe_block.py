"""Time one CLIP MoE block (CuMoSparseMLP) per experts implementation against the dense CLIP MLP on the same input.

Default sizes are CLIP ViT-L's (hidden 1024, intermediate 4096) with 4 experts, top-2, and 8 images x 577 tokens.
Top-2 does twice the dense FLOPs, so 2x the dense time is the floor. Prints a table and writes JSON.
"""

import argparse
import json
import platform
from datetime import date

import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPMLP

from modeling_cumo.moe_cumo import CuMoSparseMLP
from timing import timed


IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def measure(block, hidden: torch.Tensor, repeats: int, device: str) -> dict:
    def forward():
        with torch.no_grad():
            block(hidden)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        block(hidden.requires_grad_()).square().mean().backward()

    return {"forward_s": timed(forward, repeats, device, warmup=2), "forward_backward_s": timed(forward_backward, repeats, device, warmup=2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="CLIP hidden size")
    parser.add_argument("--intermediate", type=int, default=4096, help="CLIP MLP width")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=577, help="tokens per image (577 = 24x24 patches + CLS)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-gather-gb", type=float, default=4.0,
                        help="skip batched_mm when its per-(token, expert) weight gather would exceed this")
    parser.add_argument("--output", default="benchmarks/moe_block.json")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=8)
    hidden = torch.randn(args.images, args.tokens, args.hidden, device=args.device, dtype=dtype)
    dense = CLIPMLP(config).to(args.device, dtype)
    block = CuMoSparseMLP(config, args.hidden, args.intermediate, args.hidden, config.hidden_act, args.experts, args.top_k)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    block.to(args.device, dtype)

    rows = {"dense MLP": measure(dense, hidden, args.repeats, args.device)}
    pairs = args.images * args.tokens * args.top_k
    gather_gb = pairs * 2 * args.hidden * args.intermediate * hidden.element_size() / 1e9
    for implementation in IMPLEMENTATIONS:
        if implementation == "batched_mm" and gather_gb > args.max_gather_gb:
            rows[implementation] = {"skipped": f"gathers {gather_gb:.0f} GB of expert weights"}
            continue
        config._experts_implementation = implementation
        rows[implementation] = measure(block, hidden, args.repeats, args.device)

    base = rows["dense MLP"]
    print(f"MoE block: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts, top-{args.top_k}, "
          f"{args.images} x {args.tokens} tokens, {args.dtype}, {args.device}, {torch.get_num_threads()} threads")
    print(f"{'implementation':<16}{'forward ms':>12}{'ratio':>8}{'fwd+bwd ms':>13}{'ratio':>8}")
    for name, row in rows.items():
        if "skipped" in row:
            print(f"{name:<16}  skipped: {row['skipped']}")
            continue
        row["forward_ratio"] = row["forward_s"] / base["forward_s"]
        row["forward_backward_ratio"] = row["forward_backward_s"] / base["forward_backward_s"]
        print(f"{name:<16}{row['forward_s'] * 1e3:>12.1f}{row['forward_ratio']:>8.2f}"
              f"{row['forward_backward_s'] * 1e3:>13.1f}{row['forward_backward_ratio']:>8.2f}")
    result = {"args": vars(args), "machine": platform.processor() or platform.machine(), "date": str(date.today()),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
