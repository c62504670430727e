"""The demo world as an lmms-eval task."""
