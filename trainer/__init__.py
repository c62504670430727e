"""Training CuMo with TRL through the paper's three stages (see the trainer issue)."""
