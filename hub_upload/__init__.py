"""Converting original CuMo checkpoints and publishing models and the Space to the Hub."""
