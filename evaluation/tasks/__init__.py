"""lmms-eval tasks of this project (pass this folder to `--include_path`)."""
