"""Replicas: the whole pipeline on several devices under torch.distributed, frames round-robin."""
