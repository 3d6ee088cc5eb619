"""Every experts backend that claims LoRA support really adds the deltas.

For each such class: with a non-zero adapter the output must differ from
its own base output and equal an independent per-token computation with
the adapter merged into each expert's weights. (A backend that silently
dropped LoRA would fail the first check.)
"""
import dataclasses
import functools
import os

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


# The Triton wrapper in each place TritonExperts can compute LoRA: shrink
# kernels + expand in the GEMMs' epilogue ("auto" at this size), shrink and
# expand inside the GEMMs, aligned shrink kernels + expand as K steps of
# the GEMMs, and separate kernels (what the quantized classes always use).
PUNICA = {"torch": TorchPunicaWrapper, "triton": TritonPunicaWrapper,
          "triton-gemm": functools.partial(TritonPunicaWrapper, moe_lora_fusion="gemm"),
          "triton-loop": functools.partial(TritonPunicaWrapper, moe_lora_fusion="loop"),
          "triton-off": functools.partial(TritonPunicaWrapper, moe_lora_fusion="off")}


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
    slots[:3] = [0, 2, -1][:T]
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


def quantize_weights(variant, w, cfg):
    """(quantized ExpertWeights in the layout the quant methods produce,
    dequantized float weights, GEMM-1 and GEMM-2 input rounding of the
    reference, quant scheme name). Quantized with the checkpoint tool's own
    quantizers; dequantized by the independent test decoders."""
    from tests.quantization.reference import fake_quant, fp4_values, fp8_weight, int4_values
    from vllm.model_executor.quantization.expert_weights import Fp8ExpertQuant, PackedExpertQuant
    from vllm.model_executor.quantization.fp8_activation import Fp8ActScheme
    from vllm.tools import quantize as tool
    dev, dtype = w.w13.device, w.w13.dtype
    ident = lambda x: x  # noqa: E731
    if variant.startswith("fp8"):
        gran, act = {"fp8-channel-token": ("channel", "token"),
                     "fp8-block-group": ("block", "group"),
                     "fp8-tensor-static": ("tensor", "static"),
                     "fp8-w8a16": ("channel", None)}[variant]
        block = (32, 32)
        q, scales, deq = {}, {}, {}
        for which in ("w13", "w2"):
            full = getattr(w, which).float().cpu()
            parts = [tool.quantize_fp8(full[e], gran, block) for e in range(full.shape[0])]
            q[which] = torch.stack([p[0] for p in parts]).to(dev)
            deq[which] = torch.stack([fp8_weight(p[0], p[1], block if gran == "block" else None)
                                      for p in parts]).to(dev, dtype)
            n, k = full.shape[1:]
            if gran == "block":
                rows = [p[1].repeat_interleave(block[0], 0)[:n] for p in parts]
            else:
                rows = [p[1].reshape(-1).expand(n) for p in parts]
            scales[which] = torch.stack(rows).float().to(dev)
        static = {"w13": torch.tensor([3.0 / 448], device=dev),
                  "w2": torch.tensor([1.0 / 448], device=dev)} if act == "static" else {}
        quant = Fp8ExpertQuant(scales["w13"], scales["w2"],
                               block[1] if gran == "block" else None,
                               None if act is None else
                               Fp8ActScheme(act, 32 if act == "group" else 0),
                               static.get("w13"), static.get("w2"))
        if act is None:
            fq13 = fq2 = ident
        elif act == "static":
            fq13 = lambda x: fake_quant(x, "static", scale=3.0 / 448)  # noqa: E731
            fq2 = lambda x: fake_quant(x, "static", scale=1.0 / 448)  # noqa: E731
        else:
            fq13 = fq2 = lambda x: fake_quant(x, act, 32)  # noqa: E731
        scheme = "fp8" if act else "fp8_w8a16"
        return (ExpertWeights(q["w13"], q["w2"], w.w13_bias, w.w2_bias, quant),
                ExpertWeights(deq["w13"], deq["w2"], w.w13_bias, w.w2_bias), fq13, fq2, scheme)
    group = {"int4": 32, "nvfp4": 16, "mxfp4": 32}[variant]
    packed, scales, channel, deq = {}, {}, {}, {}
    for which in ("w13", "w2"):
        full = getattr(w, which).float().cpu()
        P, S, C, D = [], [], [], []
        for e in range(full.shape[0]):
            if variant == "int4":
                words, s = tool.quantize_int4(full[e], group)
                P.append(words.view(torch.uint8))
                S.append(s.to(dtype))
                D.append(int4_values(words, full.shape[2]) * s.double().repeat_interleave(group, 1))
            elif variant == "nvfp4":
                p, s, g = tool.quantize_nvfp4(full[e])
                P.append(p)
                S.append(s.view(torch.uint8))
                C.append((1.0 / g).expand(full.shape[1]))
                D.append(fp4_values(p) * s.double().repeat_interleave(16, 1) / g.double())
            else:
                b, s = tool.quantize_mxfp4(full[e])
                P.append(b.reshape(b.shape[0], -1))
                S.append(s)
                D.append(fp4_values(P[-1])
                         * torch.pow(2.0, s.double() - 127).repeat_interleave(32, 1))
        packed[which] = torch.stack(P).to(dev)
        scales[which] = torch.stack(S).to(dev)
        channel[which] = torch.stack(C).float().to(dev) if C else None
        deq[which] = torch.stack(D).to(dev, dtype)
    quant = PackedExpertQuant(variant, group, scales["w13"], scales["w2"], channel["w13"],
                              channel["w2"])
    return (ExpertWeights(packed["w13"], packed["w2"], w.w13_bias, w.w2_bias, quant),
            ExpertWeights(deq["w13"], deq["w2"], w.w13_bias, w.w2_bias), ident, ident, variant)


def quantized_reference(cfg, w, x, weights, ids, t_ctx, enabled, slots, fq13, fq2):
    """Like ``merged_reference`` for quantized weights ``w`` (dequantized):
    the base GEMMs read the rounded inputs ``fq(x)``, the adapters the
    unquantized ones. float32, rounding exactly where the engine rounds."""
    act = cfg.activation
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    xf = x.float().cpu()
    for t in range(x.shape[0]):
        s = slots[t]
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            w13, w2 = w.w13[e].float().cpu(), w.w2[e].float().cpu()
            d13 = torch.zeros_like(w13)
            d2 = torch.zeros_like(w2)
            if s >= 0 and enabled[s]:
                n = w13.shape[0] // len(t_ctx["w13_lora_a"])
                for i, (a, b) in enumerate(zip(t_ctx["w13_lora_a"], t_ctx["w13_lora_b"])):
                    d13[i * n:(i + 1) * n] = b[s, e].float().cpu() @ a[s, e].float().cpu()
                d2 = t_ctx["w2_lora_b"][s, e].float().cpu() @ t_ctx["w2_lora_a"][s, e].float().cpu()
            xt = xf[t:t + 1]
            h = fq13(xt) @ w13.T + xt @ d13.T + w.w13_bias[e].float().cpu()
            h = gated_activation(h, act.kind, act.interleaved, act.alpha, act.limit)
            y = fq2(h) @ w2.T + h @ d2.T + w.w2_bias[e].float().cpu()
            out[t] += float(weights[t, j]) * y[0].double()
    return out


def variants(cls) -> list[str]:
    schemes = getattr(cls, "quant_schemes", None) or ("unquantized",)
    out = ["none"] if "unquantized" in schemes else []
    if "fp8" in schemes:
        out += ["fp8-channel-token", "fp8-block-group", "fp8-tensor-static"]
    if "fp8_w8a16" in schemes:
        out += ["fp8-w8a16"]
    out += [s for s in ("int4", "nvfp4", "mxfp4") if s in schemes]
    # a LoRA-capable class without cases would pass this test without running
    assert out, f"{cls.__name__} declares no scheme this test knows: {schemes}"
    return out


def run(cls, punica_cls, activation, slices, device, dtype, tol, variant="none", T=11):
    quantized = variant != "none"
    dims = dict(H=64, I=32) if quantized else {}
    cfg, w, x, weights, ids, t_ctx, enabled, slots = make_case(activation, slices, device, dtype,
                                                               T=T, **dims)
    if quantized:
        w, deq, fq13, fq2, scheme = quantize_weights(variant, w, cfg)
        cfg = dataclasses.replace(cfg, quant_scheme=scheme)
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
    if quantized:
        ref = quantized_reference(cfg, deq, x, weights, ids, t_ctx, enabled, slots, fq13, fq2)
    else:
        ref = merged_reference(cfg, w, x, weights, ids, t_ctx, enabled, slots)
    err = ((with_lora.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{cls.name}/{variant}: relative error {err}"
    # rows with an enabled adapter changed; rows without one did not
    changed = (with_lora - base).abs().amax(dim=1).cpu() > 1e-3
    for t, s in enumerate(slots):
        assert bool(changed[t]) == (s >= 0 and bool(enabled[s])), f"{cls.name}: token {t}"


CASES = [(MoEActivation(), 2), (MoEActivation(), 1),
         (MoEActivation("swigluoai", interleaved=True), 1)]
CASE_IDS = ["silu-2d", "silu-3d", "swigluoai-3d"]


def conformance_params():
    """Unquantized classes: every activation case with both punica wrappers.
    Quantized classes (slow in the interpreter): every weight variant with
    silu and the torch wrapper, plus each class's first variant with the
    fused interleaved swigluoai case and the Triton wrapper."""
    params = []
    for cls in LORA_BACKENDS:
        vs = variants(cls)
        for v in vs:
            for (act, slices), case_id in zip(CASES, CASE_IDS):
                for punica in sorted(PUNICA):
                    if v != "none" and (case_id, punica) != ("silu-2d", "torch") and \
                            not (v == vs[0] and case_id == "swigluoai-3d" and punica == "triton"):
                        continue
                    params.append(pytest.param(cls, v, punica, act, slices,
                                               id=f"{cls.__name__}-{v}-{case_id}-{punica}"))
    return params


# On the CPU the Triton classes run in Triton's interpreter (float32; FP8
# operands as float32 copies of the same values).
@pytest.mark.parametrize("cls,variant,punica,activation,slices", conformance_params())
def test_lora_backend_conformance_cpu(cls, variant, punica, activation, slices):
    uses_triton = punica != "torch" or cls.__name__.startswith("Triton")
    if uses_triton and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter (on only without CUDA); "
                    "the GPU variant of this test covers it")
    # W8A8: a rounding boundary crossed by a last-bit difference moves one
    # activation by an FP8 step; rare, and small in the relative norm
    tol = 1e-3 if variant.startswith("fp8") and variant != "fp8-w8a16" else 1e-5
    run(cls, PUNICA[punica], activation, slices, "cpu", torch.float32, tol, variant)


# One token: the Triton classes skip the alignment kernel (one_token_alignment)
# and the Triton wrapper shrinks by pair ("loop" aligns its shrinks all the same).
@pytest.mark.parametrize("punica", ["triton", "triton-loop"])
@pytest.mark.parametrize("cls", [c for c in LORA_BACKENDS if c.__name__.startswith("Triton")],
                         ids=lambda c: c.__name__)
def test_one_token_conformance_cpu(cls, punica):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter (on only without CUDA)")
    variant = variants(cls)[0]
    tol = 1e-3 if variant.startswith("fp8") and variant != "fp8-w8a16" else 1e-5
    run(cls, PUNICA[punica], MoEActivation(), 2, "cpu", torch.float32, tol, variant, T=1)


@pytest.mark.gpu
@pytest.mark.parametrize("punica", sorted(PUNICA))
@pytest.mark.parametrize("cls,variant", [(c, v) for c in LORA_BACKENDS for v in variants(c)],
                         ids=[f"{c.__name__}-{v}" for c in LORA_BACKENDS for v in variants(c)])
@pytest.mark.parametrize("activation,slices", CASES, ids=CASE_IDS)
def test_lora_backend_conformance_gpu(cls, variant, punica, activation, slices):
    # bf16 keeps 8 mantissa bits, so a bf16 intermediate differs from the
    # float32 reference's by ~2^-9; W8A8 then rounds it to FP8 (3 bits, steps
    # of 2^-3), and ~2^-9 / 2^-3 = 1.6% of the elements land on the other side
    # of a rounding boundary, each moving a full step: sqrt(0.016) * 2^-3 ~ 1.6%
    # relative error on top of bf16's own ~0.5% (measured on the H100: 1.5-2.6%).
    # Dropped or mis-scaled LoRA deltas still fail: rows must change exactly
    # where an adapter is enabled, and there the deltas are as large as the output.
    w8a8 = variant.startswith("fp8") and variant != "fp8-w8a16"
    run(cls, PUNICA[punica], activation, slices, "cuda", torch.bfloat16, 5e-2 if w8a8 else 2e-2,
        variant)


def test_every_lora_backend_is_covered():
    names = {c.name for c in LORA_BACKENDS}
    assert {"torch", "triton"} <= names
    assert "grouped_mm" not in names
    classes = {c.__name__ for c in LORA_BACKENDS}
    assert {"TorchReferenceExperts", "TritonExperts", "TorchFp8Experts", "TritonFp8Experts",
            "TorchWeightOnlyExperts", "TritonWeightOnlyExperts"} <= classes


def test_every_lora_backend_has_cases():
    """Each LoRA-capable class runs in the conformance test above, with its
    unquantized weights or with each quantized format it declares."""
    for cls in LORA_BACKENDS:
        assert variants(cls), cls
    assert variants(next(c for c in LORA_BACKENDS if c.__name__ == "TritonExperts")) == ["none"]
