"""Sharded checkpoints (torch.distributed.checkpoint): save, resume, reshard (see manager.py)."""
