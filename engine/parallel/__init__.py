"""Everything that talks to torch.distributed (process grid, TP, SP, PP, DP)."""
