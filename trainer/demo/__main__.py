"""`cumo-demo`: build the demo world and a CuMo trained in it, end to end, offline.

    cumo-demo --output demo            # the full run (about 11-18 minutes on 2 CPU cores)
    cumo-demo --output demo --quick    # a reduced run (a few minutes)

Steps: generate the world (images of coloured shapes, captions, questions, a held-out split); train the stand-ins
(a small CLIP, contrastively, and a small Mistral with its own tokenizer); then `cumo-init` and `cumo-train` for
the paper's three stages (pt, pft, vit) exactly as on real models; finally evaluate on the held-out split.
Writes DIR/model (the final CuMo), DIR/metrics.json (with the model's answers to the Space's examples) and
DIR/expert_load.png. The ablations (dense vs co-upcycled vs from-scratch MoE, with and without bzloss):
`python -m trainer.demo.ablations --output DIR`.
"""

import argparse
import json
from pathlib import Path

from trainer.demo.pipeline import add_budget_arguments, budget_from_args, build_demo


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cumo-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for model/, metrics.json, expert_load.png")
    add_budget_arguments(parser)
    args = parser.parse_args(argv)
    metrics = build_demo(args.output, budget_from_args(args), args.seed)
    keys = ("seed", "vqa_accuracy", "accuracy_per_type", "accuracy_per_type_and_objects", "chance_accuracy",
            "llm_standin_lookups", "description_exact_match", "space_examples", "seconds", "minutes", "environment")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    wrong = [example["question"] for example in metrics["space_examples"] if not example["right"]]
    if wrong:
        print(f"The model answers {len(wrong)} of the Space's examples wrong: {wrong}")
    print(f"Chat with it: python -m space.app --model {args.output / 'model'}")


if __name__ == "__main__":
    main()
