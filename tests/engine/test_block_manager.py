import pytest

from shardserve.engine.block_manager import BlockManager, hash_block


def tokens(ids):
    """The ``(start, end) -> ids`` accessor the block manager reads new blocks through."""
    return lambda start, end: ids[start:end]


def test_allocate_and_free_account_for_every_block():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert bm.allocate("a", 10) and len(bm.block_ids("a")) == 3
    assert bm.allocate("a", 12) == []  # still fits in 3 blocks
    assert len(bm.allocate("a", 13)) == 1
    assert bm.num_free_blocks == 4
    assert bm.usage == pytest.approx(0.5)
    assert not bm.can_allocate("b", 17)
    with pytest.raises(RuntimeError):
        bm.allocate("b", 17)
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_prefix_is_shared_and_last_token_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(12))  # exactly 3 full blocks
    bm.allocate("a", 12)
    bm.register_full_blocks("a", tokens(prompt), 12)
    # A prompt of 3 full blocks may reuse only 2: the last token must be computed to sample.
    assert bm.match_prefix("b", prompt) == 8
    assert bm.block_ids("b") == bm.block_ids("a")[:2]
    assert bm.blocks[bm.block_ids("a")[0]].ref_count == 2
    longer = prompt + [99, 100]
    assert bm.match_prefix("c", longer) == 12


def test_chained_hash_distinguishes_prefixes():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    bm = BlockManager(num_blocks=16, block_size=2)
    bm.allocate("a", 4)
    bm.register_full_blocks("a", tokens([1, 2, 3, 4]), 4)
    # Same second block, different first block: no hit at all.
    assert bm.match_prefix("b", [9, 9, 3, 4, 5]) == 0


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.register_full_blocks("a", tokens([1, 2, 3, 4]), 4)
    bm.free("a")
    assert bm.num_free_blocks == 4  # cached but free
    assert bm.match_prefix("b", [1, 2, 3, 4, 5]) == 4  # still hit after free
    bm.free("b")
    # Take all 4 blocks with unrelated content: the cached ones are evicted.
    bm.allocate("c", 8)
    assert bm.match_prefix("d", [1, 2, 3, 4, 5]) == 0


def test_no_prefix_caching_means_no_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", 4)
    bm.register_full_blocks("a", tokens([1, 2, 3, 4]), 4)
    assert bm.match_prefix("b", [1, 2, 3, 4, 5]) == 0


def test_invalid_sizes_raise():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
