"""The demo over several worlds: `cumo-demo` once per seed (and per repeat), one run at a time so that each has the
machine to itself, as a user runs it; writes every run's figures and their spread.

    python benchmarks/demo_seeds.py                          # seeds 0 1 2, the full budget (about an hour on 2 cores)
    python benchmarks/demo_seeds.py --seeds 0 1 2 --repeats 2
    python benchmarks/demo_seeds.py --quick --seeds 0        # a reduced run, to try the script
    python benchmarks/demo_seeds.py --seeds 1 2 --json variant.json -- --patch-size 16   # cumo-demo flags after --

Writes OUTPUT/seed-S[-rR]/ (each run's demo folder) and the summary to --json (default
benchmarks/demo_seeds.json): per run the held-out VQA, its types, descriptions, minutes and the machine; over the
runs the mean, min and max of each figure. Prints the summary as a Markdown table.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

FIGURES = ("vqa_accuracy", "colour", "shape", "count", "position", "exists", "description_exact_match", "minutes")


def figures(metrics: dict) -> dict:
    """One run's figures, flat: overall VQA, each type, descriptions, minutes."""
    return {"vqa_accuracy": metrics["vqa_accuracy"], **metrics["accuracy_per_type"],
            "description_exact_match": metrics["description_exact_match"], "minutes": metrics["minutes"]}


def spread(runs: list[dict]) -> dict:
    return {name: {"mean": mean(run[name] for run in runs), "min": min(run[name] for run in runs),
                   "max": max(run[name] for run in runs)} for name in FIGURES}


def table(runs: list[dict], summary: dict) -> str:
    header = "| run | " + " | ".join(FIGURES) + " |\n|---|" + "---:|" * len(FIGURES) + "\n"
    rows = "".join(f"| seed {run['seed']} | " + " | ".join(f"{run[name]:.3g}" for name in FIGURES) + " |\n"
                   for run in runs)
    return header + rows + "| mean (min-max) | " + " | ".join(
        f"{summary[name]['mean']:.3g} ({summary[name]['min']:.3g}-{summary[name]['max']:.3g})" for name in FIGURES) + " |"


def parse_args(argv=None) -> argparse.Namespace:
    """This script's flags, then, after `--`, flags given to every `cumo-demo` run (`demo_args`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="worlds to build (cumo-demo --seed)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per seed")
    parser.add_argument("--output", type=Path, default=Path("demo-seeds"), help="folder for each run's demo folder")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "demo_seeds.json",
                        help="where to write the runs' figures and their spread")
    parser.add_argument("--quick", action="store_true", help="cumo-demo's reduced budget")
    args = parser.parse_args(argv[:split])
    args.demo_args = argv[split + 1:]
    return args


def demo_command(folder: Path, seed: int, args: argparse.Namespace) -> list[str]:
    return ([sys.executable, "-m", "trainer.demo", "--output", str(folder), "--seed", str(seed)]
            + ["--quick"] * args.quick + args.demo_args)


def main(argv=None):
    args = parse_args(argv)
    runs = []
    for seed in args.seeds:
        for repeat in range(args.repeats):
            folder = (args.output / (f"seed-{seed}" + (f"-r{repeat}" if args.repeats > 1 else ""))).resolve()
            command = demo_command(folder, seed, args)
            print(f"[demo_seeds] {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
            metrics = json.loads((folder / "metrics.json").read_text())
            runs.append({"seed": seed, "repeat": repeat, **figures(metrics),
                         "space_examples_right": sum(e["right"] for e in metrics["space_examples"]),
                         "environment": metrics["environment"], "budget": metrics["budget"]})
    summary = spread(runs)
    args.json.write_text(json.dumps({"demo_args": args.demo_args, "runs": runs, "spread": summary}, indent=2) + "\n")
    print(table(runs, summary))


if __name__ == "__main__":
    main()
