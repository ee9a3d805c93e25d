"""The detector: architectures, fine-tuning, inference and checkpoints."""
