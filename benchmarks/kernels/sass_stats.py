"""Compile the expert GEMM (``_fused_moe_gemm_kernel``) for sm_90a on any
machine, no GPU needed, and print per variant: registers, local memory
(spills), shared memory, SASS instruction count, the memory / MMA / barrier
instructions by kind (``LDGSTS.E.BYPASS.128``: pipelined 16-byte copies;
``LDG.E.U16``: element-wise loads) and a hash of the SASS, which tells
whether a refactor changed the code the GPU runs.

    python benchmarks/kernels/sass_stats.py                       # the built-in variants
    python benchmarks/kernels/sass_stats.py "dict(BM=128, BN=256, BK=64, stages=4, warps=8, mode=3)"

A variant: tile (BM, BN, BK), stages, warps; ``mode`` the LoRA mode (0 none,
2 shrink rows in the epilogue, 3 spread rows in extra K steps; mode 1 needs
factor pointers this script does not pass), ``per_slot``, ``early``,
``w2`` (the second GEMM: no row gather, routing weights), ``L`` slots of
rank 16, ``S`` slices, ``extra`` constexprs to override (e.g.
``dict(LORA_WAIT=True)``). Shapes are specialised as on the GPU for
Qwen3-30B-A3B (pointers 16-byte aligned, sizes and row strides multiples
of 16, unit strides constant). Uses Triton's bundled ptxas and nvdisasm.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from vllm.lora.ops.triton_ops.moe_lora_in_gemm import NO_LORA_KERNEL_ARGS  # noqa: E402
from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (  # noqa: E402
    _fused_moe_gemm_kernel)

BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
VARIANTS = [
    dict(BM=128, BN=256, BK=64, stages=4, warps=8),
    dict(BM=128, BN=256, BK=64, stages=4, warps=8, mode=2, per_slot=True),
    dict(BM=128, BN=256, BK=64, stages=4, warps=8, mode=3),
    dict(BM=64, BN=128, BK=64, stages=3, warps=4, mode=2, per_slot=True),
    dict(BM=64, BN=128, BK=64, stages=3, warps=4, mode=3),
    dict(BM=16, BN=64, BK=128, stages=3, warps=4, mode=2, early=True),
    dict(BM=16, BN=64, BK=128, stages=3, warps=4, mode=2, early=True,
         extra=dict(LORA_WAIT=True)),
]


def compile_variant(BM: int, BN: int, BK: int, stages: int, warps: int, mode: int = 0,
                    per_slot: bool = False, early: bool = False, w2: bool = False, L: int = 4,
                    S: int = 2, extra: dict | None = None):
    kernel = _fused_moe_gemm_kernel
    pointers = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", sorted_pair_ids_ptr="*i32",
                    expert_ids_ptr="*i32", num_pairs_post_padded_ptr="*i32")
    if w2:
        pointers["topk_weights_ptr"] = "*fp32"
    # integer arguments: 16 = a multiple of 16, 1 / 0 = that constant, None = unknown
    ints = dict(N=16, K=16, num_valid_pairs=16, num_padded_pairs=16, stride_am=16,
                stride_ak=1, stride_be=16, stride_bn=16, stride_bk=1, stride_cm=16,
                stride_cn=1, stride_bias_e=0, stride_bias_n=0)
    constexprs = dict(TOP_K=8, GATHER_ROWS=not w2, HAS_BIAS=False, MUL_ROUTED_WEIGHT=w2,
                      INPUT_PRECISION="tf32", BLOCK_SIZE_M=BM, BLOCK_SIZE_N=BN,
                      BLOCK_SIZE_K=BK, GROUP_SIZE_M=1)
    constexprs.update({k: v for k, v in NO_LORA_KERNEL_ARGS.items() if k.isupper()})
    if mode:
        pointers.update(lora_slot_ptr="*i32", lora_enabled_ptr="*i32", lora_b0_ptr="*bf16",
                        lora_b_meta_ptr="*i64",
                        lora_inter_ptr="*bf16" if mode == 3 else "*fp32")
        ints.update(lora_num_slots=None, lora_rank=16, stride_lar=0, stride_lak=0,
                    stride_lbn=16, stride_lbr=1, stride_li_part=16, stride_li_s=16,
                    stride_li_p=16, stride_li_r=1)
        block_l = triton.next_power_of_2(L)
        constexprs.update(LORA_MODE=mode, LORA_EARLY=early, LORA_PER_SLOT=per_slot,
                          LORA_NUM_SLICES=S, LORA_BLOCK_L=block_l, LORA_BLOCK_R=16,
                          LORA_PRECISION="tf32", LORA_FACTOR_ALIGN=8,
                          LORA_STEPS=triton.cdiv(block_l * 16, BK) if mode == 3 else 0)
    constexprs.update(extra or {})
    signature, values, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name], values[name] = "constexpr", constexprs[name]
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints and ints[name] in (0, 1):
            signature[name], values[name] = "constexpr", ints[name]
        elif name in ints:
            signature[name] = "i32"
            if ints[name] == 16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # a pointer the variant passes as None
            signature[name], values[name] = "constexpr", None
    return triton.compile(ASTSource(kernel, signature, values, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def report(compiled) -> str:
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    code = [line.split(";")[0] for line in sass.splitlines()
            if re.match(r"\s+/\*[0-9a-f]+\*/", line)]
    ops = collections.Counter(
        m.group(1) for line in code
        if (m := re.search(r"\b((?:LDGSTS|LDG|STG|HGMMA|BAR|LDS|STS|LDSM)[.\w]*)", line)))
    regs, local = (re.search(rf"{key}:(\d+)", usage).group(1) for key in ("REG", "LOCAL"))
    digest = hashlib.md5("\n".join(code).encode()).hexdigest()[:12]
    return (f"regs {regs} local {local} smem {compiled.metadata.shared} instrs {len(code)} "
            f"sass {digest}\n    {dict(sorted(ops.items()))}")


if __name__ == "__main__":
    variants = [eval(arg, {"dict": dict}) for arg in sys.argv[1:]] or VARIANTS
    for variant in variants:
        print(variant)
        print("   ", report(compile_variant(**variant)), flush=True)
