"""Every experts backend that claims LoRA support really adds the deltas.

For each such class: with a non-zero adapter the output must differ from
its own base output and equal an independent per-token computation with
the adapter merged into each expert's weights. (A backend that silently
dropped LoRA would fail the first check.)
"""
import pytest
import torch

from vllm.lora.lora_context import MoELoRAContext
from vllm.lora.punica_wrapper.torch_wrapper import TorchPunicaWrapper
from vllm.lora.punica_wrapper.triton_wrapper import TritonPunicaWrapper
from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.oracle import all_experts_backends

LORA_BACKENDS = [c for c in all_experts_backends() if c.supports_lora()]


PUNICA = {"torch": TorchPunicaWrapper, "triton": TritonPunicaWrapper}


def make_case(activation, slices, device, dtype, seed=0, E=6, H=32, I=16, L=3, R=8, T=11, k=2):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=0.2):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    cfg = FusedMoEConfig(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H,
                         intermediate_size=I, activation=activation, has_bias=True,
                         dtype=dtype, device=device)
    w = ExpertWeights(rnd(E, 2 * I, H), rnd(E, H, I), rnd(E, 2 * I), rnd(E, H))
    x = rnd(T, H, s=1.0)
    weights, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k)
    ids = ids.to(torch.int32).to(device)
    weights = weights.to(device)
    n = 2 * I // slices
    ctx_tensors = dict(
        w13_lora_a=[rnd(L, E, R, H) for _ in range(slices)],
        w13_lora_b=[rnd(L, E, n, R) for _ in range(slices)],
        w2_lora_a=rnd(L, E, R, I), w2_lora_b=rnd(L, E, H, R))
    # slot 1 holds an adapter without expert weights for this layer
    enabled = torch.tensor([1, 0, 1], dtype=torch.int32, device=device)
    slots = torch.randint(-1, L, (T,), generator=g).tolist()
    slots[0], slots[1], slots[2] = 0, 2, -1
    return cfg, w, x, weights, ids, ctx_tensors, enabled, slots


def merged_reference(cfg, w, x, weights, ids, t_ctx, enabled, slots):
    """Per token: each chosen expert's weights plus its slot's B @ A, in float64."""
    act = cfg.activation
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        s = slots[t]
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            w13 = w.w13[e].double().cpu().clone()
            w2 = w.w2[e].double().cpu().clone()
            if s >= 0 and enabled[s]:
                n = w13.shape[0] // len(t_ctx["w13_lora_a"])
                for i, (a, b) in enumerate(zip(t_ctx["w13_lora_a"], t_ctx["w13_lora_b"])):
                    w13[i * n:(i + 1) * n] += b[s, e].double().cpu() @ a[s, e].double().cpu()
                w2 += t_ctx["w2_lora_b"][s, e].double().cpu() @ t_ctx["w2_lora_a"][s, e].double().cpu()
            h = x[t].double().cpu() @ w13.T + w.w13_bias[e].double().cpu()
            h = gated_activation(h, act.kind, act.interleaved, act.alpha, act.limit)
            out[t] += float(weights[t, j]) * (h @ w2.T + w.w2_bias[e].double().cpu())
    return out


def run(cls, punica_cls, activation, slices, device, dtype, tol):
    cfg, w, x, weights, ids, t_ctx, enabled, slots = make_case(activation, slices, device, dtype)
    punica = punica_cls(3, torch.device(device))
    punica.update_mapping(slots)
    n = 2 * cfg.intermediate_size // slices
    ctx = MoELoRAContext(**t_ctx, adapter_enabled=enabled, max_loras=3, top_k=cfg.top_k,
                         w13_num_slices=slices, w13_slice_offsets=[i * n for i in range(slices)],
                         punica=punica)
    experts = cls(cfg)
    base = torch.full_like(x, float("nan"))
    with_lora = torch.full_like(x, float("nan"))
    experts.apply(base, x, w, weights, ids)
    experts.apply(with_lora, x, w, weights, ids, lora_context=ctx)
    ref = merged_reference(cfg, w, x, weights, ids, t_ctx, enabled, slots)
    err = ((with_lora.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{cls.name}: relative error {err}"
    # rows with an enabled adapter changed; rows without one did not
    changed = (with_lora - base).abs().amax(dim=1).cpu() > 1e-3
    for t, s in enumerate(slots):
        assert bool(changed[t]) == (s >= 0 and bool(enabled[s])), f"{cls.name}: token {t}"


CASES = [(MoEActivation(), 2), (MoEActivation(), 1),
         (MoEActivation("swigluoai", interleaved=True), 1)]


# On the CPU the Triton classes run in Triton's interpreter (float32).
@pytest.mark.parametrize("punica", sorted(PUNICA))
@pytest.mark.parametrize("cls", LORA_BACKENDS, ids=lambda c: c.name)
@pytest.mark.parametrize("activation,slices", CASES, ids=["silu-2d", "silu-3d", "swigluoai-3d"])
def test_lora_backend_conformance_cpu(cls, punica, activation, slices):
    run(cls, PUNICA[punica], activation, slices, "cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("punica", sorted(PUNICA))
@pytest.mark.parametrize("cls", LORA_BACKENDS, ids=lambda c: c.name)
@pytest.mark.parametrize("activation,slices", CASES, ids=["silu-2d", "silu-3d", "swigluoai-3d"])
def test_lora_backend_conformance_gpu(cls, punica, activation, slices):
    run(cls, PUNICA[punica], activation, slices, "cuda", torch.bfloat16, 2e-2)


def test_every_lora_backend_is_covered():
    names = {c.name for c in LORA_BACKENDS}
    assert {"torch", "triton"} <= names
    assert "grouped_mm" not in names
