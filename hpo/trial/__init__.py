"""One fine-tune: its plan, its model and Trainer, pruning, metrics, memory, checkpoints, trackers, preflight."""
