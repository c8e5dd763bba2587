"""Training: the trainer loop, optimizer and schedule, grad-cache, checkpoints, logging."""
