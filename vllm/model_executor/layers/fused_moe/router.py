"""Top-k expert selection: softmax or sigmoid scores, optional score
correction bias and grouped selection, renormalisation and scaling."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm import envs


@dataclass(frozen=True)
class RouterConfig:
    top_k: int
    # "softmax" (over all experts), "sigmoid", or "topk_softmax" (softmax over
    # the k largest logits only, as GPT-OSS)
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_groups: int = 1           # > 1: pick ``topk_groups`` groups first
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0


def select_experts(router_logits: torch.Tensor, cfg: RouterConfig,
                   correction_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights float32 [T, k], topk_ids int32 [T, k]).

    The correction bias (DeepSeek-V3 / GLM-4.5) only steers which experts are
    chosen; the weights come from the unbiased scores.
    """
    # one native launch (12 µs on the H100 against torch's 21-29 µs at 1-128
    # tokens) where the library is built and covers the scoring
    if envs.VLLM_MOE_OPS_IMPL in ("auto", "native") and router_logits.is_cuda \
            and correction_bias is None and cfg.num_expert_groups == 1:
        from vllm import native
        routed = native.topk_route(router_logits, cfg.top_k, cfg.scoring, cfg.renormalize,
                                   cfg.routed_scaling_factor)
        if routed is not None:
            return routed
    return select_experts_torch(router_logits, cfg, correction_bias)


def select_experts_torch(router_logits: torch.Tensor, cfg: RouterConfig,
                         correction_bias: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` in torch ops: every scoring, grouping and bias (and
    the reference of the native routing)."""
    logits = router_logits.float()
    if cfg.scoring == "topk_softmax":
        top = logits.topk(cfg.top_k, dim=-1)
        return torch.softmax(top.values, dim=-1), top.indices.to(torch.int32)
    if cfg.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif cfg.scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown router scoring {cfg.scoring!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_expert_groups > 1:
        T, E = choice.shape
        groups = choice.view(T, cfg.num_expert_groups, E // cfg.num_expert_groups)
        if correction_bias is None:
            group_scores = groups.max(dim=-1).values
        else:
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(cfg.topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
        choice = choice.masked_fill(
            group_mask.repeat_interleave(E // cfg.num_expert_groups, dim=1) == 0, float("-inf"))
    topk_ids = choice.topk(cfg.top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if cfg.renormalize:
        denom = topk_weights.sum(dim=-1, keepdim=True)
        if cfg.scoring == "sigmoid":
            denom = denom + 1e-20
        topk_weights = topk_weights / denom
    if cfg.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * cfg.routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)
