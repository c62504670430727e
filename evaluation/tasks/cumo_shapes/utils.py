"""cumo_shapes: the demo world's held-out questions scored as `cumo-demo` scores them (its `normalise`, then exact
match; overall and per question type)."""

from pathlib import Path

from PIL import Image

from trainer.demo.evaluate import normalise


def doc_to_visual(doc, lmms_eval_specific_kwargs):
    """The question's image, read next to the held-out file (the yaml's `heldout`, also its data file)."""
    return [Image.open(Path(lmms_eval_specific_kwargs["heldout"]).parent / doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """One overall and one per-type score for the question (each metric averages the questions that report it)."""
    right = float(normalise(results[0]) == normalise(doc["answer"]))
    return {"vqa_accuracy": right, f"{doc['type']}_accuracy": right}
