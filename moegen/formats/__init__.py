"""Weight formats checkpoints ship in beyond plain floats: each module knows one format's on-disk names,
its host layout and its dequantization (FP8 block-scaled now)."""
