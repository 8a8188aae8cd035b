"""How many KV blocks the host cache has: what --host-kv-memory holds, else what B sequences of
--max-seq-len need (every sequence's worst case, so nothing is ever preempted)."""

from __future__ import annotations

from moegen.config import ModelConfig
from moegen.models.kv_cache import kv_bytes_per_token
from moegen.runtime.config import RuntimeConfig


def host_kv_bytes_per_token(cfg: ModelConfig, rcfg: RuntimeConfig) -> int:
    """Host bytes one token takes in the KV cache (every layer), in --kv-dtype: what the link carries per staged
    token too. (FP8's scales live on the device, `kv.fp8.scale_bytes`.)"""
    return kv_bytes_per_token(cfg, rcfg.kv_torch_dtype)


def kv_block_bytes(cfg: ModelConfig, rcfg: RuntimeConfig) -> int:
    """Host bytes of one block: --kv-block-size tokens of every layer's KV."""
    return rcfg.kv_block_size * host_kv_bytes_per_token(cfg, rcfg)


def host_kv_blocks(cfg: ModelConfig, rcfg: RuntimeConfig, batch_size: int) -> int:
    """Blocks in the host KV cache; raises when --host-kv-memory holds not even one."""
    size = kv_block_bytes(cfg, rcfg)
    if rcfg.host_kv_memory is None:
        return batch_size * -(-rcfg.max_seq_len // rcfg.kv_block_size)
    blocks = rcfg.host_kv_memory // size
    if blocks < 1:
        raise ValueError(f"--host-kv-memory {rcfg.host_kv_memory} bytes holds no KV block: a block of "
                         f"--kv-block-size {rcfg.kv_block_size} tokens takes {size} bytes of this model's KV; "
                         "raise --host-kv-memory")
    return blocks


def too_long(prompt_tokens: int, capacity_tokens: int) -> str | None:
    """Why a prompt can't run in a KV cache of `capacity_tokens` tokens, or None when it can."""
    if prompt_tokens <= capacity_tokens:
        return None
    return (f"its {prompt_tokens} prompt tokens don't fit the host KV cache ({capacity_tokens} tokens in all); "
            "raise --host-kv-memory")
