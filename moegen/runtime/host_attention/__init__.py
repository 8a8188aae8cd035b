"""Attention beside the device (issue 17, being built; not wired into the runtime yet): decode attention for a
share of a step's sequences on host threads, straight over the paged host KV cache (`attend`)."""
