"""Layer 1: what lands on disk: checkpoints, their metadata and optimizer state, run directories and their locks."""
