"""The paper's ablations in miniature: the vit stage run four ways from the same pre-finetuned demo model.

    python -m trainer.demo.ablations --output demo            # reuses demo/work from `cumo-demo --output demo`
    python -m trainer.demo.ablations --output demo --quick    # reduced budget

- dense: no MoE (the LLaVA-style baseline);
- co-upcycled + bzloss: CuMo (experts copied from the dense MLPs, balance and z losses on);
- co-upcycled, no bzloss: the same without the auxiliary losses (expert load left to itself);
- from scratch + bzloss: MoE blocks with random experts (the paper's Table 3a baseline).

Each variant reports held-out VQA accuracy per question type and, for the MoE ones, the spread of the expert load
(smallest and largest share of the top-k slots over all MoE layers). Writes DIR/ablations.json and DIR/ablations.md.
"""

import argparse
import json
import tempfile
from pathlib import Path

from trainer.demo.pipeline import Budget, Laps, add_budget_arguments, budget_from_args, build_until_vit, evaluate_model, train_vit


VARIANTS = {
    "dense": ["--upcycle_vision", "false", "--upcycle_projector", "false"],
    "co-upcycled + bzloss (CuMo)": [],
    "co-upcycled, no bzloss": ["--balance_loss_coef", "0", "--router_z_loss_coef", "0"],
    "from scratch + bzloss": ["--upcycle_experts_init", "random"],
}


def run_ablations(output: Path, budget: Budget, seed: int = 0, log=print) -> dict:
    work = output / "work"
    laps = Laps(log)
    if not (work / "pft" / "config.json").is_file():
        build_until_vit(work, budget, seed, laps)
    data = work / "data"
    results = {}
    for name, extra in VARIANTS.items():
        with tempfile.TemporaryDirectory(dir=work) as folder:  # keep only the numbers, not four models
            train_vit(work, data, Path(folder), budget, seed, extra)
            metrics = evaluate_model(Path(folder), data)
        shares = [share for layer in metrics["expert_load"].values() for share in layer]
        results[name] = {
            "vqa_accuracy": metrics["vqa_accuracy"],
            "accuracy_per_type": metrics["accuracy_per_type"],
            "chance_accuracy": metrics["chance_accuracy"],
            "expert_load": metrics["expert_load"],
            "expert_share_min": min(shares, default=None),
            "expert_share_max": max(shares, default=None),
        }
        laps(name)
    report = {"budget": budget.__dict__, "seed": seed, "variants": results, "seconds": laps.seconds}
    (output / "ablations.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "ablations.md").write_text(markdown_table(results))
    return report


def markdown_table(results: dict) -> str:
    types = sorted(next(iter(results.values()))["accuracy_per_type"])
    lines = ["| variant | VQA | " + " | ".join(types) + " | expert share min–max |",
             "|---|---:|" + "---:|" * len(types) + "---|"]
    for name, r in results.items():
        spread = "–" if r["expert_share_min"] is None else f"{r['expert_share_min']:.2f}–{r['expert_share_max']:.2f}"
        lines.append(f"| {name} | {r['vqa_accuracy']:.2f} | "
                     + " | ".join(f"{r['accuracy_per_type'][t]:.2f}" for t in types) + f" | {spread} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True,
                        help="demo folder: its work/pft is reused when present, else built first")
    add_budget_arguments(parser)
    args = parser.parse_args(argv)
    report = run_ablations(args.output, budget_from_args(args), args.seed)
    print(markdown_table(report["variants"]))


if __name__ == "__main__":
    main()
