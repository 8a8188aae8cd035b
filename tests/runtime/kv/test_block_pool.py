"""The KV block pool and prefix names against hand-worked sequences of takes, finds and releases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moegen.runtime.kv.block_pool import BlockPool, OutOfBlocks
from moegen.runtime.kv.prefix import block_names


def test_blocks_are_taken_once_and_freed_least_recently_first():
    pool = BlockPool(4)
    a = pool.take(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free == 1 and pool.refs == [1, 1, 1, 0]
    with pytest.raises(OutOfBlocks, match="2 KV blocks asked for, 1 free of 4"):
        pool.take(2)
    pool.release([a[1]])
    pool.release([a[0]])
    assert pool.num_free == 3
    assert pool.take(3) == [3, a[1], a[0]]  # never used first, then in the order they were freed
    with pytest.raises(ValueError, match="released more often"):
        pool.release([a[2], a[2]])


def test_a_named_block_stays_findable_after_release_until_it_is_taken_again():
    pool = BlockPool(3)
    first, second = pool.take(2)
    pool.name(first, b"prefix-0")
    assert pool.find(b"prefix-0") == first and pool.refs[first] == 2  # a second prompt shares it
    pool.release([first, first, second])
    assert pool.num_free == 3 and pool.name_of[first] == b"prefix-0"  # unheld, counted free, still findable
    assert pool.find(b"prefix-0") == first and pool.num_free == 2  # held again: no longer free
    pool.release([first])
    # the untouched block 2 goes first, then `second`, then (its name dropped) `first`
    assert pool.take(3) == [2, second, first]
    assert pool.find(b"prefix-0") is None and pool.name_of[first] is None


def test_the_first_block_named_for_a_prefix_keeps_the_name():
    pool = BlockPool(2)
    a, b = pool.take(2)
    pool.name(a, b"x")
    pool.name(b, b"x")  # both prefilled the same prefix in one step
    assert pool.find(b"x") == a and pool.name_of[b] is None
    pool.release([a, a, b])
    with pytest.raises(ValueError, match="not held"):
        pool.name(b, b"y")


def test_prefix_names_cover_every_token_before_them():
    size = 4
    base = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    names = block_names(base, size)
    assert len(names) == 2  # 10 tokens: two full blocks, the last two tokens unnamed
    assert block_names(base[:8] + [99], size) == names  # the same full blocks, another tail
    other = block_names([1, 2, 3, 0] + base[4:], size)  # block 0 differs, block 1's own tokens don't
    assert other[0] != names[0] and other[1] != names[1]
    assert block_names(base[:3], size) == [] and len(set(names)) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "release", "name", "find"]), st.integers(0, 5)), max_size=60))
def test_no_block_is_lost_or_held_twice(ops):
    """Any sequence of operations: every block is free or held, never both, and the holders add up."""
    pool, held = BlockPool(6), []
    for op, n in ops:
        if op == "take" and n <= pool.num_free:
            held += pool.take(n)
        elif op == "release" and held:
            pool.release([held.pop(n % len(held))])
        elif op == "name" and held:
            pool.name(held[n % len(held)], bytes([n]))
        elif op == "find" and (b := pool.find(bytes([n]))) is not None:
            held.append(b)
        free = set(pool._free)
        assert all(pool.refs[b] == 0 for b in free) and all(pool.refs[b] == held.count(b) for b in range(6))
        assert len(free) + len({b for b in range(6) if pool.refs[b]}) == 6


def test_a_block_table_finds_its_prefix_then_grows_and_lets_go():
    from moegen.runtime.kv.block_table import BlockTable

    size, pool = 4, BlockPool(4)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2 tokens
    first = BlockTable(size)
    assert first.find_prefix(pool, block_names(prompt, size)) == 0  # nothing computed yet
    first.grow(pool, len(prompt))
    assert len(first.blocks) == 3 and first.capacity == 12
    for block, name in zip(first.blocks, block_names(prompt, size)):
        pool.name(block, name)  # its prefill computed them
    second = BlockTable(size)
    assert second.find_prefix(pool, block_names(prompt[:8] + [50, 51, 52], size)) == 2  # the 8 shared tokens
    assert second.blocks == first.blocks[:2] and pool.refs[first.blocks[0]] == 2
    second.grow(pool, 11)
    assert len(second.blocks) == 3 and pool.num_free == 0
    with pytest.raises(OutOfBlocks):
        first.grow(pool, 13)  # a 4th block: none left
    assert len(first.blocks) == 3  # what it held before
    first.release(pool)
    second.release(pool)
    assert pool.num_free == 4 and pool.refs == [0] * 4 and first.blocks == [] == second.blocks
