"""The paged host KV cache (being built): a pool of fixed-size blocks with holder counts and a prefix index
(`block_pool`), each sequence's block table (`block_table`), and the hash chain that names a prompt's full
blocks (`prefix`). Not wired into the runtime yet: the KV cache is still one row per sequence
(`models.kv_cache`)."""
