"""Names for a prompt's full KV blocks: a hash chain over its token ids, as automatic prefix caching keys
them. Block i's name covers every token up to the end of block i, so two prompts share block i's name only
when their first (i + 1) * block_size tokens are equal; a partial last block has no name (it is never shared).
"""

from __future__ import annotations

import hashlib
from array import array

DIGEST_BYTES = 16  # 128 bits: a collision among the blocks of any job is not a concern


def block_names(token_ids: list[int], block_size: int) -> list[bytes]:
    """The name of each full block of `token_ids` (len(token_ids) // block_size of them)."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    names, parent = [], b""
    for first in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
        h.update(array("q", token_ids[first: first + block_size]).tobytes())
        parent = h.digest()
        names.append(parent)
    return names


def shared_prefix_tokens(prompts: list[list[int]], block_size: int) -> int:
    """Prompt tokens that prefix sharing would find already computed, were every prompt's full blocks kept: each
    prompt's leading blocks named by an earlier prompt (never its last token's block, which it computes)."""
    seen: set[bytes] = set()
    found = 0
    for prompt in sorted(prompts, key=len, reverse=True):  # the scheduler's order
        names = block_names(prompt, block_size)
        hit = 0
        for name in names[: (len(prompt) - 1) // block_size]:
            if name not in seen:
                break
            hit += 1
        found += hit * block_size
        seen.update(names)
    return found
