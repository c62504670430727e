"""lmms-eval integration: the `cumo` model and the demo world as a task (`cumo_shapes`)."""
