"""Which adapter slot each token of a step runs with, in the forms kernels read."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRATokenMapping:
    """Built once per step by the punica wrapper.

    ``sorted_token_ids`` groups the tokens by slot (slots ascending, token
    order kept within a slot); the tokens of slot ``s`` are
    ``sorted_token_ids[slot_start[s]:slot_start[s + 1]]``. Tokens without an
    adapter (slot -1) come after the last slot's run and belong to none.
    """
    token_lora_slot: torch.Tensor   # [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor  # [T] int32
    slot_start: torch.Tensor        # [max_loras + 1] int32
    max_loras: int

    @staticmethod
    def build(token_lora_slot: torch.Tensor, max_loras: int) -> "LoRATokenMapping":
        slots = token_lora_slot.to(torch.int32)
        keyed = torch.where(slots < 0, max_loras, slots)
        order = torch.sort(keyed, stable=True).indices.to(torch.int32)
        counts = torch.bincount(keyed.long(), minlength=max_loras + 1)[:max_loras]
        start = torch.zeros(max_loras + 1, dtype=torch.int32, device=slots.device)
        start[1:] = torch.cumsum(counts, 0)
        return LoRATokenMapping(slots, order, start, max_loras)

    @property
    def num_tokens(self) -> int:
        return self.token_lora_slot.shape[0]
