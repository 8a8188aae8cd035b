"""Random-weight checkpoints in the exact on-disk format of each family."""
