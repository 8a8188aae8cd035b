"""Model code: plain torch units over batched token tensors; no devices, streams or placement."""
