"""KV block pool with prefix caching. Plain Python: no torch, no CUDA.

Each full block is identified by a chained hash of its tokens and of the previous block's hash
(nano-vllm, vLLM's automatic prefix caching), so equal prefixes map to equal block chains.
Blocks are shared by reference count; a block whose count falls to zero stays cached and is
evicted least recently used when a new block is needed.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Content hash of one full block, chained to its parent's hash (SHA-256, 16 bytes kept)."""
    h = hashlib.sha256(parent_hash or b"root")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()[:16]


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    """Set once the block is full and registered in the prefix cache."""


@dataclass
class _Table:
    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0
    """Leading blocks already registered in the prefix cache."""
    last_hash: bytes | None = None


class BlockManager:
    """Allocates KV blocks to requests and shares full prompt blocks between them.

    Raises:
        ValueError: ``num_blocks`` or ``block_size`` is not positive.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        """Blocks with ref_count 0, oldest first (cached ones are evicted from the front)."""
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, _Table] = {}
        self.hits = 0
        self.queries = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self._tables[request_id].block_ids if request_id in self._tables else []

    def num_held_blocks(self, request_id: str) -> int:
        table = self._tables.get(request_id)
        return len(table.block_ids) if table is not None else 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------
    def match_prefix(self, request_id: str, token_ids: list[int]) -> int:
        """Attach the longest cached chain of full blocks to a new request.

        At least one token is left uncomputed so the step that finishes the prompt has a query to
        sample from. Returns the number of tokens served from the cache.
        """
        table = self._tables.setdefault(request_id, _Table())
        if not self.enable_prefix_caching or table.block_ids:
            return 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        parent = None
        for i in range(max_blocks):
            h = hash_block(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self._cached.get(h)
            if block_id is None:
                break
            self._ref(block_id)
            table.block_ids.append(block_id)
            parent = h
        table.num_hashed = len(table.block_ids)
        table.last_hash = parent
        self.queries += max(len(token_ids) - 1, 0)
        self.hits += len(table.block_ids) * self.block_size
        return len(table.block_ids) * self.block_size

    def has_new_full_blocks(self, request_id: str, num_computed: int) -> bool:
        """Whether :meth:`register_full_blocks` would hash a block (lets callers skip building token lists)."""
        table = self._tables.get(request_id)
        if table is None or not self.enable_prefix_caching:
            return False
        return min(num_computed // self.block_size, len(table.block_ids)) > table.num_hashed

    def register_full_blocks(
        self, request_id: str, token_slice: Callable[[int, int], list[int]], num_computed: int
    ) -> None:
        """Hash and publish the request's blocks that are full of computed tokens.

        Args:
            token_slice: ``(start, end) -> token ids`` of the request (only the new blocks are read, so the
                cost per block does not grow with the request's length).
        """
        table = self._tables.get(request_id)
        if table is None or not self.enable_prefix_caching:
            return
        num_full = min(num_computed // self.block_size, len(table.block_ids))
        for i in range(table.num_hashed, num_full):
            h = hash_block(table.last_hash, token_slice(i * self.block_size, (i + 1) * self.block_size))
            block = self.blocks[table.block_ids[i]]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block.block_id
            table.last_hash = h
        table.num_hashed = max(table.num_hashed, num_full)

    # -- allocation ------------------------------------------------------------------------
    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        have = len(self.block_ids(request_id))
        return self.blocks_needed(num_tokens) - have <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold ``num_tokens`` tokens; returns the new block ids.

        Raises:
            RuntimeError: not enough free blocks (call :meth:`can_allocate` first).
        """
        table = self._tables.setdefault(request_id, _Table())
        need = self.blocks_needed(num_tokens) - len(table.block_ids)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, free {len(self._free)}")
        new = [self._take_free() for _ in range(max(need, 0))]
        table.block_ids.extend(new)
        return new

    def free(self, request_id: str) -> None:
        """Release every block of the request (cached ones stay reusable until evicted)."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        # Release the tail first so that eviction (oldest first) takes the ends of chains first.
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict from the prefix cache
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (those in use stay allocated)."""
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
