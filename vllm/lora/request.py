"""LoRARequest: names the adapter a request runs with."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    """An adapter by name, a positive integer id unique per adapter, and the
    directory holding its PEFT files."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} has no lora_path")

    def __hash__(self) -> int:
        return hash(self.lora_int_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_int_id == other.lora_int_id
