"""Paged KV-cache block accounting (the tensors live in the model runner)."""
from __future__ import annotations

from collections import deque

from vllm.core.request import Request


class BlockManager:
    """Hands out fixed-size KV blocks; a request holds
    ``ceil(tokens / block_size)`` of them."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's blocks to hold ``num_tokens`` tokens; False
        (and nothing taken) when too few blocks are free."""
        need = self.blocks_for(num_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if need > len(self.free_blocks):
            return False
        request.block_ids.extend(self.free_blocks.popleft() for _ in range(need))
        return True

    def free(self, request: Request) -> None:
        self.free_blocks.extend(request.block_ids)
        request.block_ids = []
