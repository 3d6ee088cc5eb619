"""Quantized checkpoints served end to end, with and without LoRA.

For each scheme the tool writes a quantized copy of a tiny float model;
the reference is transformers running the *dequantized* weights (decoded by
tests/quantization/reference.py, independently of vllm), with, for W8A8
schemes, every quantized projection's input rounded through FP8 the same way
(per token, per token group, or the static scale) and LoRA deltas on the
unquantized input. One engine per case serves base requests and two
adapters in the same batches; every output must be the reference's greedy
choice under teacher forcing, and its logprobs must match.

Tolerances. Weight-only schemes compute exactly the reference's function
in float32 (dequantized weights, unquantized activations): logprobs within
1e-3 and greedy ties within 1e-4, as the float tests. W8A8 rounds
activations to 3 mantissa bits; an activation that sits on a rounding
boundary can round the other way when the engine's float32 sums differ
from transformers' in the last bit (different summation order), moving
that element by one FP8 step (up to 6%). Such flips are rare but shift
logits by ~1e-3..1e-2 on these tiny models, so W8A8 cases allow logprob
errors of 3e-2 and treat top-2 logits within 3e-2 as ties (the
engine's token must still be within that of the reference's best). In
practice almost every W8A8 logprob matches to ~1e-6; the worst seen flip
moved one by 2.4e-2.
"""
import copy
import os

import pytest
import torch

from tests.lora_utils import merged_hf_model, write_peft_3d_adapter, write_per_expert_adapter
from tests.quantization.reference import input_scales, patch_w8a8, write_reference_checkpoint
from tests.utils import PROMPTS, hf_model, model_dir
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.tools.quantize import quantize_checkpoint

# name: (tool scheme, tool kwargs, activation quantization of the reference)
SCHEMES = {
    "fp8-block": ("fp8-block", dict(block=(32, 32)), ("group", 32)),
    "fp8-ct-channel-dynamic": ("fp8-ct", dict(fp8_weights="channel", fp8_acts="dynamic"),
                               ("token", 0)),
    "fp8-ct-tensor-static": ("fp8-ct", dict(fp8_weights="tensor", fp8_acts="static"),
                             ("static", 0)),
    "fp8-ct-block": ("fp8-ct", dict(fp8_weights="block", block=(16, 32)), ("group", 32)),
    "int4-ct-g32": ("int4-ct", dict(group_size=32), None),
    "int4-ct-g128": ("int4-ct", dict(group_size=128), None),
    "nvfp4": ("nvfp4", {}, None),
    "nvfp4-modelopt": ("nvfp4-modelopt", {}, None),
}
# group size 128 needs every input dim to be a multiple of 128
WIDE = dict(hidden_size=128, head_dim=32, intermediate_size=128, moe_intermediate_size=128)

# every variant on Qwen3-MoE; one per checkpoint family on GLM-4.5 (dense
# first layer, shared experts, grouped sigmoid routing); MXFP4 is GPT-OSS's
CASES = [(s, "qwen3_moe") for s in SCHEMES] + \
    [(s, "glm4_moe") for s in ("fp8-block", "fp8-ct-tensor-static", "int4-ct-g32", "nvfp4")] + \
    [("mxfp4", "gpt_oss")]

N_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def check(reference, prompt_ids, out, logprob_tol, tie_tol):
    ids = prompt_ids + list(out.token_ids)
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()[len(prompt_ids) - 1:-1]
    ref = torch.log_softmax(logits, dim=-1)
    worst = 0.0
    for step, (row, token) in enumerate(zip(logits, out.token_ids)):
        gap = (row.max() - row[token]).item()
        assert gap <= tie_tol, f"step {step}: token {token} is {gap:.2e} below the reference argmax"
        for tid, lp in out.logprobs[step].items():
            worst = max(worst, abs(lp.logprob - ref[step, tid].item()))
    assert worst < logprob_tol, f"logprob error {worst:.2e} (bound {logprob_tol:.2e})"
    return worst


def prepare(root, scheme, arch):
    """(quantized checkpoint, adapters, references by adapter id, W8A8?)."""
    if scheme == "mxfp4":
        tool_scheme, kwargs, act = "mxfp4", {}, None
    else:
        tool_scheme, kwargs, act = SCHEMES[scheme]
    overrides = WIDE if scheme == "int4-ct-g128" else {}
    src = model_dir(str(root), arch, **overrides)
    qdir = os.path.join(root, f"{arch}-{scheme}")
    if not os.path.isfile(os.path.join(qdir, "config.json")):
        quantize_checkpoint(src, qdir, tool_scheme, **kwargs)
    deq = write_reference_checkpoint(qdir, qdir + "-deq")

    adapters = {}
    for i in (1, 2):
        path = os.path.join(root, f"ad-{arch}{'-wide' if overrides else ''}-{i}")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            if arch == "gpt_oss":
                write_peft_3d_adapter(src, path, seed=i, attention=("q_proj", "o_proj"))
            else:
                extra = dict(shared=True, dense=True) if arch == "glm4_moe" else {}
                write_per_expert_adapter(src, path, seed=i, rank=4, alpha=8, scale=0.2, **extra)
        adapters[i] = path

    base = hf_model(deq)
    refs = {0: base, **{i: merged_hf_model(deq, a) for i, a in adapters.items()}}
    if act is not None:
        kind, group = act
        static = input_scales(qdir) if kind == "static" else None
        refs[0] = copy.deepcopy(base)   # patched below; the cached base stays as is
        for m in refs.values():
            patch_w8a8(m, base, kind, group, static)
    return qdir, adapters, refs, act is not None


def run_engine(llm, adapters, refs, logprob_tol, tie_tol):
    prompts = PROMPTS[:3]
    tok = llm.get_tokenizer()
    requests = [None] + [LoRARequest(f"a{i}", i, adapters[i]) for i in (1, 2)]
    batch = [(p, r) for p in prompts for r in requests]
    outs = llm.generate([p for p, _ in batch], GREEDY, lora_request=[r for _, r in batch],
                        use_tqdm=False)
    for (prompt, req), out in zip(batch, outs):
        check(refs[0 if req is None else req.lora_int_id], tok.encode(prompt), out.outputs[0],
              logprob_tol, tie_tol)
    # adapters change the outputs (LoRA is not silently dropped)
    by = {(p, None if r is None else r.lora_int_id): o.outputs[0].logprobs
          for (p, r), o in zip(batch, outs)}
    for p in prompts:
        first = lambda i: list(by[(p, i)][0].values())[0].logprob  # noqa: E731
        assert abs(first(None) - first(1)) > 1e-4 or abs(first(None) - first(2)) > 1e-4


@pytest.mark.parametrize("scheme,arch", CASES, ids=[f"{s}-{a}" for s, a in CASES])
def test_quantized_model_with_lora(root, scheme, arch):
    qdir, adapters, refs, w8a8 = prepare(root, scheme, arch)
    tol = (3e-2, 3e-2) if w8a8 else (1e-3, 1e-4)
    llm = LLM(qdir, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=16)
    run_engine(llm, adapters, refs, *tol)


GPU_CASES = [("fp8-block", "qwen3_moe"), ("fp8-ct-channel-dynamic", "glm4_moe"),
             ("fp8-ct-tensor-static", "qwen3_moe"), ("int4-ct-g32", "qwen3_moe"),
             ("int4-ct-g128", "glm4_moe"), ("nvfp4", "glm4_moe"),
             ("nvfp4-modelopt", "qwen3_moe"), ("mxfp4", "gpt_oss")]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,arch", GPU_CASES, ids=[f"{s}-{a}" for s, a in GPU_CASES])
def test_quantized_model_with_lora_gpu(root, scheme, arch):
    """The GPU path (Triton FP8 W8A8 / weight-only experts, Triton
    attention and LoRA kernels, CUDA graphs) in float32 against the same
    references, with the float32 bounds above. bf16 kernels are checked
    against their references in the conformance test; at the model level
    bf16 flips near-tied expert choices of these tiny random models, which
    says nothing about the kernels."""
    qdir, adapters, refs, w8a8 = prepare(root, scheme, arch)
    llm = LLM(qdir, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=16,
              device="cuda", dtype="float32")
    model = llm.llm_engine.runner.model
    backends = {type(m.quant_method.kernel.experts).__name__ for m in model.modules()
                if hasattr(m, "quant_method") and hasattr(m.quant_method, "kernel")}
    assert backends <= {"TritonFp8Experts", "TritonWeightOnlyExperts"}, backends
    run_engine(llm, adapters, refs, *((3e-2, 3e-2) if w8a8 else (1e-3, 1e-4)))
