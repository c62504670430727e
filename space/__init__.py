"""The Gradio app that serves a CuMo checkpoint as a Hugging Face Space (see the Space issue)."""
