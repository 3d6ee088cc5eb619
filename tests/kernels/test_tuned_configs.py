"""Tuned expert-GEMM configurations: lookup, use by TritonExperts, and the tuner."""
import json

import pytest
import torch

from benchmarks.kernels.tune_moe import tune_lora_tokens, tune_tokens
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.experts.torch_ref import TorchReferenceExperts
from vllm.model_executor.layers.fused_moe.experts.triton import TritonExperts
from vllm.model_executor.layers.fused_moe.kernels import tuned_configs


def cfg(block_m, n=32):
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
            "num_warps": 4, "num_stages": 2}


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    from vllm.lora.ops.triton_ops.moe_lora_configs import moe_lora_launch
    monkeypatch.setenv("VLLM_TUNED_CONFIG_DIR", str(tmp_path))
    tuned_configs.load_table.cache_clear()
    moe_lora_launch.cache_clear()
    yield tmp_path
    tuned_configs.load_table.cache_clear()
    moe_lora_launch.cache_clear()


def write_table(directory, E, H, I, dtype, table):
    name = tuned_configs.config_filename(E, H, I, dtype, tuned_configs.device_key())
    (directory / name).write_text(json.dumps(table))


def test_nearest_token_count_and_heuristic_fallback(tuned_dir):
    E, H, I = 8, 64, 32
    # no file: the heuristic (16-row blocks for a few tokens)
    c13, c2 = tuned_configs.expert_gemm_configs(2, 2, E, H, I, torch.float32)
    assert c13["BLOCK_SIZE_M"] == c2["BLOCK_SIZE_M"] == 16
    write_table(tuned_dir, E, H, I, torch.float32,
                {"1": {"w13": cfg(16), "w2": cfg(16)}, "64": {"w13": cfg(64), "w2": cfg(64)}})
    tuned_configs.load_table.cache_clear()
    assert tuned_configs.expert_gemm_configs(3, 2, E, H, I, torch.float32)[0]["BLOCK_SIZE_M"] == 16
    assert tuned_configs.expert_gemm_configs(40, 2, E, H, I, torch.float32)[1]["BLOCK_SIZE_M"] == 64


def test_wide_tiles_from_64_pairs_per_expert_where_shared_memory_holds_them(monkeypatch):
    E, H, I, k = 8, 4096, 14336, 2
    untuned = tuned_configs.expert_gemm_configs_untuned
    monkeypatch.setattr(tuned_configs, "_shared_memory_bytes", lambda: 227 * 1024)
    c13, c2 = untuned(256, k, E, H, I, torch.bfloat16)  # 64 pairs per expert
    assert (c13["BLOCK_SIZE_M"], c13["BLOCK_SIZE_N"], c13["num_warps"], c13["num_stages"]) == \
        (128, 256, 8, 4) and c2 == c13
    # the LoRA epilogue keeps room in shared memory; narrow GEMMs keep narrow tiles
    if not tuned_configs.load_table(tuned_configs.config_filename(
            E, H, I, torch.bfloat16, tuned_configs.device_key())):
        lora13, _ = tuned_configs.expert_gemm_configs(256, k, E, H, I, torch.bfloat16, True)
        assert lora13 == dict(c13, num_stages=3)
    assert untuned(256, k, E, 64, 32, torch.bfloat16)[1]["BLOCK_SIZE_N"] == 64
    # fewer pairs, 32-bit operands or too little shared memory: the generic heuristic
    for tokens, dtype, smem in ((255, torch.bfloat16, 227 * 1024), (256, torch.float32,
                                227 * 1024), (256, torch.bfloat16, 100 * 1024)):
        monkeypatch.setattr(tuned_configs, "_shared_memory_bytes", lambda smem=smem: smem)
        assert untuned(tokens, k, E, H, I, dtype) == (
            tuned_configs.default_config(tuned_configs.moe_block_size(tokens * k, E), 2 * I, H,
                                         dtype),
            tuned_configs.default_config(tuned_configs.moe_block_size(tokens * k, E), H, I,
                                         dtype))


def test_lora_gemm_configs_where_tuned(tuned_dir):
    E, H, I = 8, 64, 32
    write_table(tuned_dir, E, H, I, torch.float32,
                {"1": {"w13": cfg(16), "w2": cfg(16)},
                 "64": {"w13": cfg(64), "w2": cfg(64), "w13_lora": cfg(64, 128),
                        "w2_lora": cfg(64, 16)}})
    lookup = tuned_configs.expert_gemm_configs
    assert lookup(60, 2, E, H, I, torch.float32) == (cfg(64), cfg(64))
    assert lookup(60, 2, E, H, I, torch.float32, lora=True) == (cfg(64, 128), cfg(64, 16))
    assert lookup(1, 2, E, H, I, torch.float32, lora=True) == (cfg(16), cfg(16))  # none tuned
    write_table(tuned_dir, E, H, I, torch.float32,
                {"8": {"w13": cfg(16), "w2": cfg(16), "w13_lora": cfg(32), "w2_lora": cfg(32)}})
    tuned_configs.load_table.cache_clear()
    # LoRA configs of another block size than the alignment's are not used
    assert lookup(8, 2, E, H, I, torch.float32, lora=True) == (cfg(16), cfg(16))
    write_table(tuned_dir, E, H, I, torch.float32,
                {"1": {"w13": cfg(16), "w2": cfg(16)},
                 "64": {"w13": cfg(64), "w2": cfg(64), "w13_lora": cfg(64, 128),
                        "w2_lora": cfg(64, 16)}})
    tuned_configs.load_table.cache_clear()
    tuned = tuned_configs.lora_gemm_configs_tuned
    assert [tuned(t, E, H, I, torch.float32) for t in (1, 60, 500)] == [False, True, True]
    assert not tuned(60, E, H, 2 * I, torch.float32)  # no table for the shape


def test_triton_experts_follow_the_tuned_table(tuned_dir):
    E, H, I, T, k = 8, 64, 32, 5, 2
    write_table(tuned_dir, E, H, I, torch.float32, {"4": {"w13": cfg(32, 64), "w2": cfg(32)}})
    moe = FusedMoEConfig(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H,
                         intermediate_size=I, activation=MoEActivation(), has_bias=False,
                         dtype=torch.float32, device="cpu")
    experts = TritonExperts(moe)
    assert experts.block_size(T) == 32
    g = torch.Generator().manual_seed(0)
    w = ExpertWeights(torch.randn(E, 2 * I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 6)
    x = torch.randn(T, H, generator=g)
    weights, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k)
    out, ref = torch.full((T, H), float("nan")), torch.empty(T, H)
    experts.apply(out, x, w, weights, ids.to(torch.int32))
    TorchReferenceExperts(moe).apply(ref, x, w, weights, ids.to(torch.int32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [16, 64])  # 64: the epilogue adds one dot per slot
def test_lora_steps_run_the_lora_gemm_configs(tuned_dir, block_m):
    """A layer step with LoRA in the GEMM epilogue takes the entry's LoRA
    configs (other column blocks than the base's here) and matches the
    torch reference."""
    from benchmarks.kernels.benchmark_moe_lora import SHAPES, Case, check
    H, I, E, k = SHAPES["tiny"]
    write_table(tuned_dir, E, H, I, torch.float32,
                {"8": {"w13": cfg(block_m, 32), "w2": cfg(block_m, 32),
                       "w13_lora": cfg(block_m, 16), "w2_lora": cfg(block_m, 64)}})
    moe = FusedMoEConfig(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H,
                         intermediate_size=I, activation=MoEActivation(), has_bias=False,
                         dtype=torch.float32, device="cpu")
    assert TritonExperts(moe)._configs(8, lora=True) == (cfg(block_m, 16), cfg(block_m, 64))
    err = check(Case("tiny", 8, 3, 8), "triton", "cpu", torch.float32, fusion="epilogue")
    assert err < 1e-4


def test_tuner_picks_a_checked_config():
    space = dict(m=[16, 32], n=[32], k=[32], group=[1], warps=[4], stages=[2])
    entry = tune_tokens(H=64, I=32, E=4, k=2, T=6, space=space, dtype=torch.float32,
                        device="cpu", iters=1, mode="eager")
    assert entry["w13"]["BLOCK_SIZE_M"] == entry["w2"]["BLOCK_SIZE_M"] in (16, 32)


def test_base_retune_keeps_lora_configs_of_its_block_size():
    from benchmarks.kernels.tune_moe import keep_lora_configs
    old = {"w13": cfg(16), "w2": cfg(16), "w13_lora": cfg(16, 64), "w2_lora": cfg(16, 64)}
    assert keep_lora_configs(old, {"w13": cfg(16, 128), "w2": cfg(16)}) == {
        "w13_lora": cfg(16, 64), "w2_lora": cfg(16, 64)}
    assert keep_lora_configs(old, {"w13": cfg(32), "w2": cfg(32)}) == {}
    assert keep_lora_configs(None, {"w13": cfg(32), "w2": cfg(32)}) == {}


def test_lora_tuner_keeps_the_block_and_adds_checked_configs():
    space = dict(m=[], n=[16, 32], k=[32], group=[1], warps=[4], stages=[2])
    base = {"w13": cfg(16), "w2": cfg(16)}
    entry = tune_lora_tokens(H=64, I=32, E=4, k=2, T=6, entry=base, L=2, R=8, space=space,
                             dtype=torch.float32, device="cpu", iters=1, mode="eager")
    assert entry["w13"] == base["w13"] and entry["w2"] == base["w2"]
    assert entry["w13_lora"]["BLOCK_SIZE_M"] == entry["w2_lora"]["BLOCK_SIZE_M"] == 16
    assert entry["w13_lora"]["BLOCK_SIZE_N"] in (16, 32)


def test_moe_lora_launch_follows_the_tuned_table_and_tuner(tuned_dir):
    """The punica wrapper's MoE LoRA launch comes from a tuned file when one
    exists for the layer, slots, rank and device (heuristics otherwise), and
    the tuner writes entries whose configs it checked."""
    from benchmarks.kernels.tune_moe_lora import tune_tokens as tune_lora
    from vllm.lora.ops.triton_ops.moe_lora_configs import (moe_lora_config_filename,
                                                           moe_lora_launch)
    E, H, I, k, L, R = 4, 64, 32, 2, 2, 8
    assert moe_lora_launch(3, k, E, H, I, R, R, L, torch.float32).block_size_m == 16
    space = dict(m=[16, 32], k=[32], split=[1, 2], stages=[2], shrink_warps=[4], n=[32],
                 expand_warps=[4])
    entry = tune_lora(H, I, E, k, L, R, T=6, space=space, dtype=torch.float32, device="cpu",
                      iters=1, mode="eager")
    entry = {**entry, "block_size_m": 32}
    entry["w2"]["shrink"] = {**entry["w2"]["shrink"], "SPLIT_K": 2}
    name = moe_lora_config_filename(E, H, I, R, L, torch.float32, tuned_configs.device_key())
    (tuned_dir / name).write_text(json.dumps({"6": entry}))
    tuned_configs.load_table.cache_clear()
    moe_lora_launch.cache_clear()
    launch = moe_lora_launch(5, k, E, H, I, R, R, L, torch.float32)
    assert launch.block_size_m == 32 and launch.w2_shrink["SPLIT_K"] == 2
    assert moe_lora_launch(5, k, E, H, I, R, R, L + 1, torch.float32).block_size_m == 16
