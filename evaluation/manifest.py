"""lmms-eval's entry point for `--model cumo` (group `lmms_eval.models` in setup.py). Kept apart from the model class
so that lmms-eval's start-up, which loads every registered manifest, imports neither torch nor the model."""

from lmms_eval.models.registry_v2 import ModelManifest


MANIFEST = ModelManifest(model_id="cumo", chat_class_path="evaluation.lmms_eval_cumo.CuMo")
