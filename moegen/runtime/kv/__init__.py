"""The paged host KV cache: a pool of fixed-size blocks with holder counts and a prefix index (`block_pool`),
each sequence's block table (`block_table`), the hash chain that names a prompt's full blocks (`prefix`), the
scheduler's side of it: admission, growth, preemption and shared prefixes (`manager`, expecting output lengths
with `lengths`), how many blocks there are (`sizing`), and staging a micro-batch's blocks onto the device
(`staging`). --batching model keeps its cache on the device, one block of S positions per sequence."""
