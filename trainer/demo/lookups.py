"""Does the LLM stand-in learn to find the object a question names? Trains it exactly as `cumo-demo` does (same
world, tokenizer, scene chats and budget flags) and probes it every `--every` steps on fresh scenes of 2-3 shapes
given in words, each question asked alone after the image (teacher-forced exact answers per question type).

    python -m trainer.demo.lookups --output lookups --seed 1 --patch-size 16 --every 100

A run of the demo whose LLM stand-in ends with colour (an object found by its shape) or shape (found by its colour)
near chance falls short in those answers whatever the later stages do (docs/demo_experiments.md), so this is the
quick loop (about 5 minutes on 2 cores at the full budget) for trying changes to the stand-in. Writes
DIR/lookups.json: the probe at each step.
"""

import argparse
import json
from pathlib import Path

from trainer.demo import standins
from trainer.demo.pipeline import add_budget_arguments, budget_from_args, image_tokens, train_llm_standin, write_world


def trace(output: Path, budget, seed: int, every: int, log=print) -> list[dict]:
    output.mkdir(parents=True, exist_ok=True)
    _, tokenizer = write_world(output, budget, seed)
    probes = []

    def probe(step, model):
        if step % every == 0 or step == budget.llm_steps:
            probes.append({"step": step, **standins.lookup_accuracy(model, tokenizer, image_tokens(budget), seed=seed)})
            log(" ".join(f"{key} {value}" for key, value in probes[-1].items()))

    train_llm_standin(output, tokenizer, budget, seed, callback=probe)
    (output / "lookups.json").write_text(json.dumps({"seed": seed, "budget": budget.__dict__, "probes": probes}, indent=1))
    return probes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.lookups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for the world, the stand-in and lookups.json")
    parser.add_argument("--every", type=int, default=100, help="probe every this many LLM steps (and at the last)")
    add_budget_arguments(parser)
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be at least 1")
    trace(args.output, budget_from_args(args), args.seed, args.every)


if __name__ == "__main__":
    main()
