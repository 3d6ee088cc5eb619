"""FusedMoE: the routed experts of one MoE layer.

Holds this rank's expert weights (stacked: w13 [E, 2I, H], w2 [E, H, I]),
the global->local expert map under expert parallelism, the router settings,
and a quant method that runs the modular kernel. The ``lora_context`` is an
explicit argument of ``forward`` and travels unchanged to the experts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vllm.distributed.parallel_state import ParallelContext
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.method import (FusedMoEMethodBase,
                                                         UnquantizedFusedMoEMethod)
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts
from vllm.model_executor.layers.linear import WeightShapeError, copy_checked

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


def expert_placement(num_experts: int, ep_size: int, ep_rank: int, strategy: str) -> list[int]:
    """Global ids of the experts that live on ``ep_rank``.

    linear: contiguous ranges (the first ``E % ep_size`` ranks take one
    extra); round_robin: every ``ep_size``-th expert starting at the rank.
    """
    if strategy == "round_robin":
        return list(range(ep_rank, num_experts, ep_size))
    if strategy != "linear":
        raise ValueError(f"unknown expert placement strategy {strategy!r}")
    base, extra = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, extra)
    return list(range(start, start + base + (1 if ep_rank < extra else 0)))


def w13_rank_rows(w13: torch.Tensor, dim: int, interleaved: bool, rank: int,
                  tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's rows of a full gate/up tensor along ``dim``
    (2I long): the rank's intermediate slice of gate and of up, kept in the
    same layout (concatenated halves, or interleaved pairs)."""
    part = w13.shape[dim] // (2 * tp_size)
    if interleaved:
        return w13.narrow(dim, rank * 2 * part, 2 * part)
    half = part * tp_size
    return torch.cat([w13.narrow(dim, rank * part, part),
                      w13.narrow(dim, half + rank * part, part)], dim=dim)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 *, params_dtype: torch.dtype, router: RouterConfig,
                 parallel: ParallelContext | None = None,
                 activation: MoEActivation = MoEActivation(), has_bias: bool = False,
                 has_correction_bias: bool = False, moe_backend: str = "auto",
                 lora_enabled: bool = False, device: str = "cpu",
                 quant_method: FusedMoEMethodBase | None = None):
        super().__init__()
        self.parallel = parallel or ParallelContext.single()
        p = self.parallel
        if intermediate_size % p.moe_tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by "
                             f"tensor parallel size {p.moe_tp_size}")
        if num_experts < p.ep_size:
            raise ValueError(f"{num_experts} experts cannot be split over {p.ep_size} ranks")
        self.local_experts = expert_placement(num_experts, p.ep_size, p.ep_rank,
                                              p.expert_placement_strategy)
        if p.ep_size > 1:
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
            expert_map[self.local_experts] = torch.arange(len(self.local_experts), dtype=torch.int32)
            self.register_buffer("expert_map", expert_map, persistent=False)
        else:
            self.expert_map = None
        self.router = router
        self.moe_backend = moe_backend
        self.lora_enabled = lora_enabled
        self.quant_method = quant_method or UnquantizedFusedMoEMethod()
        self.moe_config = FusedMoEConfig(
            num_experts=num_experts, num_local_experts=len(self.local_experts), top_k=top_k,
            hidden_size=hidden_size, intermediate_size=intermediate_size // p.moe_tp_size,
            activation=activation, has_bias=has_bias, dtype=params_dtype, device=device,
            tp_rank=p.moe_tp_rank, tp_size=p.moe_tp_size, ep_rank=p.ep_rank, ep_size=p.ep_size,
            quant_scheme=self.quant_method.scheme, quant_group_size=self.quant_method.group_size)
        self.quant_method.create_weights(self)
        if has_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts),
                                                        requires_grad=False)
        else:
            self.e_score_correction_bias = None
        self.quant_method.build_kernel(self)

    # -- loading ----------------------------------------------------------------
    def local_index(self, expert_id: int) -> int | None:
        if self.expert_map is None:
            return expert_id if 0 <= expert_id < self.moe_config.num_experts else None
        local = int(self.expert_map[expert_id])
        return None if local < 0 else local

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str,
                      expert_id: int) -> None:
        """Copy one expert's on-disk tensor into its slot of a stacked param.

        shard_id: "w1" (gate, [I, H]), "w3" (up, [I, H]), "w13" (gate and up
        fused in this layer's layout, [2I, H]) or "w2" (down, [H, I]); the
        same ids with 1-D tensors load biases. Experts of other ranks are
        skipped; this rank's slice of the intermediate dim is taken.
        """
        if not 0 <= expert_id < self.moe_config.num_experts:
            raise WeightShapeError(f"expert id {expert_id} out of range "
                                   f"(the model has {self.moe_config.num_experts} experts)")
        local = self.local_index(expert_id)
        if local is None:
            return
        if getattr(param, "quant_param", False):
            self._load_quant_param(param, loaded, shard_id, local)
            return
        cfg = self.moe_config
        I, rank, tp = cfg.intermediate_size, cfg.tp_rank, cfg.tp_size
        target = param.data[local]
        interleaved = cfg.activation.interleaved
        if shard_id in ("w1", "w3"):
            _check_rows(loaded, I * tp, shard_id)
            part = loaded.narrow(0, rank * I, I)
            first = shard_id == "w1"
            dest = target[0 if first else 1::2] if interleaved else target[0:I] if first else target[I:]
            copy_checked(dest, part)
        elif shard_id == "w13":
            _check_rows(loaded, 2 * I * tp, shard_id)
            copy_checked(target, w13_rank_rows(loaded, 0, interleaved, rank, tp))
        elif shard_id == "w2":
            if loaded.dim() == 1:  # bias: added by one rank only when ranks split I
                copy_checked(target, loaded if rank == 0 else torch.zeros_like(loaded))
            else:
                if loaded.shape[-1] != I * tp:
                    raise WeightShapeError(f"w2 shape {tuple(loaded.shape)} does not match the "
                                           f"expected {(cfg.hidden_size, I * tp)}")
                copy_checked(target, loaded.narrow(1, rank * I, I))
        else:
            raise ValueError(f"unknown expert shard id {shard_id!r}")

    def _load_quant_param(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str,
                          local: int) -> None:
        """Place one expert's quantization tensor (a scale, or packed
        weights) in a stacked quant parameter. The parameter declares its
        layout (set by the quant method):

        - ``expert_scalar``: one value per expert and shard, ``[E, 2]``
          (w1, w3) for w13 and ``[E]`` for w2 (per-tensor scales);
        - otherwise rows follow the logical output rows like the weight
          (gate/up placement, this rank's rows), with ``quant_rows`` logical
          rows per on-disk row (block scales, expanded to one row each here),
          and columns are this rank's slice of the input dim for w2 when
          ``quant_cols`` (logical input columns per stored column) is set,
          else kept whole. A trailing unit dim on disk (``[N, 1]`` channel
          scales) is dropped when the parameter has none.
        """
        cfg = self.moe_config
        I, rank, tp = cfg.intermediate_size, cfg.tp_rank, cfg.tp_size
        target = param.data[local]
        if getattr(param, "expert_scalar", False):
            if loaded.numel() != 1:
                raise WeightShapeError(f"{shard_id} scale of shape {tuple(loaded.shape)} is not "
                                       "a per-tensor scalar")
            value = loaded.reshape(()).to(target.dtype)
            if shard_id == "w2":
                target.copy_(value)
            elif shard_id in ("w1", "w3", "w13"):
                target[{"w1": slice(0, 1), "w3": slice(1, 2), "w13": slice(0, 2)}[shard_id]] = value
            else:
                raise ValueError(f"unknown expert shard id {shard_id!r}")
            return
        if loaded.dim() == target.dim() + 1 and loaded.shape[-1] == 1:
            loaded = loaded.squeeze(-1)
        full_rows = {"w1": I * tp, "w3": I * tp, "w13": 2 * I * tp, "w2": cfg.hidden_size}
        if shard_id not in full_rows:
            raise ValueError(f"unknown expert shard id {shard_id!r}")
        rows_per = getattr(param, "quant_rows", 1)
        if rows_per > 1:  # one stored row per block of output rows
            if loaded.shape[0] != -(-full_rows[shard_id] // rows_per):
                raise WeightShapeError(f"{shard_id} block scale shape {tuple(loaded.shape)} does "
                                       f"not cover {full_rows[shard_id]} rows in blocks of "
                                       f"{rows_per}")
            loaded = loaded.repeat_interleave(rows_per, dim=0)[:full_rows[shard_id]]
        interleaved = cfg.activation.interleaved
        if shard_id in ("w1", "w3"):
            _check_rows(loaded, I * tp, shard_id)
            part = loaded.narrow(0, rank * I, I)
            first = shard_id == "w1"
            if interleaved:
                dest = target[0 if first else 1::2]
            else:
                dest = target[0:I] if first else target[I:]
            copy_checked(dest, part)
        elif shard_id == "w13":
            _check_rows(loaded, 2 * I * tp, shard_id)
            copy_checked(target, w13_rank_rows(loaded, 0, interleaved, rank, tp))
        else:
            cols_per = getattr(param, "quant_cols", 0)
            if cols_per and tp > 1:
                cols = target.shape[1]
                if loaded.shape[1] != cols * tp:
                    raise WeightShapeError(f"w2 shape {tuple(loaded.shape)} does not match "
                                           f"{cols * tp} columns")
                loaded = loaded.narrow(1, rank * cols, cols)
            copy_checked(target, loaded)

    # -- compute ----------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                lora_context: "MoELoRAContext | None" = None) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.router,
                                                self.e_score_correction_bias)
        return self.quant_method.apply(self, hidden_states, topk_weights, topk_ids,
                                       lora_context=lora_context)

    def extra_repr(self) -> str:
        c = self.moe_config
        return (f"experts={c.num_local_experts}/{c.num_experts}, top_k={c.top_k}, "
                f"hidden={c.hidden_size}, intermediate={c.intermediate_size}, "
                f"backend={'/'.join(k.experts.name for k in self.quant_method.kernels())}")


def _check_rows(loaded: torch.Tensor, rows: int, shard_id: str) -> None:
    if loaded.shape[0] != rows:
        raise WeightShapeError(f"{shard_id} shape {tuple(loaded.shape)} does not match the "
                               f"expected {rows} rows")
