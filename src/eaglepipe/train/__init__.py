"""Drafter training: batching and packing, the TTT unroll and loss, the loop, checkpoints, offline cache."""
