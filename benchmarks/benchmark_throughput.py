"""Offline throughput: prompts/s and output tokens/s of the engine, optionally
next to Hugging Face transformers ``generate`` on the same model and batch.

    # a random-weight model with Qwen3-30B-A3B layer shapes, 4 layers deep
    python benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b --num-layers 4 \
        --batch-size 64 --input-len 128 --output-len 128 --compare-hf

    # any local checkpoint
    python benchmarks/benchmark_throughput.py --model /path/to/model --batch-size 8

    # what LoRA costs: (a) LoRA off, (b) LoRA on with base-only requests,
    # (c) every request with one of 4 random rank-16 adapters (experts + q/v)
    python benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b --lora-comparison 4

    # what async scheduling (host work of step n+1 under the device's step n) gains
    python benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b --compare-sync

Single-GPU configurations are all loaded at once and timed in alternation
(``--repeats`` rounds, median shown with the spread of the runs), so the
ratio column — each row against the first — compares runs made under the
same conditions.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {
    # hidden, moe intermediate, experts, top-k, heads, kv heads, head dim, vocab
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, intermediate_size=6144),
}


def make_random_model(shape: str, num_layers: int, out_dir: str, dtype: torch.dtype) -> str:
    """A random-weight checkpoint with real layer shapes (few layers deep)."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from vllm.tools.make_tiny_model import build_tokenizer
    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3MoeConfig(num_hidden_layers=num_layers, max_position_embeddings=4096,
                         norm_topk_prob=True, eos_token_id=eos, bos_token_id=eos,
                         **SHAPES[shape])
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
    return out_dir


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


class TimedEngine:
    """One engine configuration, kept alive so that runs of several
    configurations can alternate (their ratios then share the machine's
    state); multi-rank engines cannot coexist in one process and run in turn."""

    def __init__(self, name: str, model: str, prompts: list[list[int]], args,
                 loras: list | None = None, **engine_kwargs):
        from vllm import LLM, SamplingParams
        self.name, self.args, self.loras = name, args, loras
        max_len = args.input_len + args.output_len + 8
        # room for the whole batch, and no more: several engines share the GPU
        blocks = len(prompts) * -(-max_len // 16) + 8
        self.llm = LLM(model, dtype=args.dtype, max_model_len=max_len,
                       max_num_seqs=max(args.batch_size, 1), moe_backend=args.moe_backend,
                       enforce_eager=args.enforce_eager, num_gpu_blocks_override=blocks,
                       tensor_parallel_size=args.tensor_parallel_size,
                       enable_expert_parallel=args.enable_expert_parallel, **engine_kwargs)
        self.params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        self.batch = [{"prompt_token_ids": p} for p in prompts]
        # same shapes as the timed runs, so Triton compiles every kernel variant first
        self.llm.generate(self.batch, SamplingParams(max_tokens=4, ignore_eos=True),
                          lora_request=loras, use_tqdm=False)
        self.times: list[float] = []

    def run(self) -> None:
        _sync()
        start = time.perf_counter()
        if self.args.profile and not self.times:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                   if torch.cuda.is_available() else [])
            with profile(activities=activities) as prof:
                outs = self._generate()
            for key in ("self_cpu_time_total", "self_device_time_total"):
                print(prof.key_averages().table(sort_by=key, row_limit=self.args.profile))
        else:
            outs = self._generate()
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == self.args.output_len for o in outs)
        print(f"{self.name}: generated {len(outs)} x {self.args.output_len} tokens in "
              f"{elapsed:.3f} s", flush=True)
        self.times.append(elapsed)

    def _generate(self):
        outs = self.llm.generate(self.batch, self.params, lora_request=self.loras, use_tqdm=False)
        _sync()
        return outs

    def close(self) -> None:
        self.llm.llm_engine.shutdown()
        del self.llm
        _free()


def time_engines(specs: list[tuple[str, dict]], model: str, prompts: list[list[int]],
                 args) -> list[tuple[str, list[float]]]:
    """``specs``: (row name, TimedEngine keyword arguments). Single-rank
    engines are all built first, then timed round-robin for
    ``args.repeats`` rounds; multi-rank ones one after another."""
    def build(name: str, kwargs: dict) -> TimedEngine:
        return TimedEngine(name, model, prompts, args, **kwargs)

    if args.tensor_parallel_size > 1:
        results = []
        for name, kwargs in specs:
            engine = build(name, kwargs)
            for _ in range(args.repeats):
                engine.run()
            results.append((name, engine.times))
            engine.close()
        return results
    engines = [build(name, kwargs) for name, kwargs in specs]
    for _ in range(args.repeats):
        for engine in engines:
            engine.run()
    for engine in engines:
        engine.close()
    return [(e.name, e.times) for e in engines]


def write_random_adapter(model: str, out: str, rank: int, seed: int) -> str:
    """A per-expert PEFT adapter with random factors on every expert's
    gate/up/down and on q_proj/v_proj of every layer."""
    import json
    from safetensors.torch import save_file
    from transformers import AutoConfig
    if os.path.isfile(os.path.join(out, "adapter_config.json")):
        return out
    cfg = AutoConfig.from_pretrained(model)
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    E = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(module: str, d_in: int, d_out: int) -> None:
        key = f"base_model.model.model.layers.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * d_in ** -0.5
                                           ).to(torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01
                                           ).to(torch.bfloat16)
    for layer in range(cfg.num_hidden_layers):
        add(f"{layer}.self_attn.q_proj", H, cfg.num_attention_heads * hd)
        add(f"{layer}.self_attn.v_proj", H, cfg.num_key_value_heads * hd)
        for e in range(E):
            add(f"{layer}.mlp.experts.{e}.gate_proj", H, I)
            add(f"{layer}.mlp.experts.{e}.up_proj", H, I)
            add(f"{layer}.mlp.experts.{e}.down_proj", I, H)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
                  f)
    return out


def run_hf(model: str, prompts: list[list[int]], output_len: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        _sync()
        start = time.perf_counter()
        out = hf.generate(ids, **kw)
        _sync()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + output_len
    del hf
    _free()
    return elapsed


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--random-shape", choices=sorted(SHAPES))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--model-dir", default="/tmp/bench-random-model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--moe-backend", default="auto")
    p.add_argument("--lora-comparison", type=int, default=0, metavar="N",
                   help="time LoRA off / on with base requests / on with N adapters")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="engine flag for every row (default: the engine's, on for one GPU)")
    p.add_argument("--compare-sync", action="store_true",
                   help="add a row without LoRA and with synchronous scheduling")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per configuration (the table shows the median)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="profile the first timed run of each configuration; print the top ROWS "
                        "ops by host and device time")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time transformers generate on the same batch")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    model = args.model or make_random_model(args.random_shape, args.num_layers, args.model_dir,
                                            dtype)
    from transformers import AutoConfig
    vocab = min(AutoConfig.from_pretrained(model).vocab_size, 400)
    prompts = random_prompts(args.batch_size, args.input_len, vocab)
    label = f"vllm tp={args.tensor_parallel_size}{' ep' if args.enable_expert_parallel else ''}"
    common = {} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling}
    specs: list[tuple[str, dict]] = [(label, common)]
    if args.lora_comparison:
        from vllm.lora.request import LoRARequest
        n = args.lora_comparison
        lora_kwargs = {**common, "enable_lora": True, "max_loras": n,
                       "max_lora_rank": args.lora_rank}
        paths = [write_random_adapter(model, f"{model}-lora{i}-r{args.lora_rank}",
                                      args.lora_rank, seed=i) for i in range(n)]
        loras = [LoRARequest(f"a{i % n}", i % n + 1, paths[i % n]) for i in range(len(prompts))]
        specs += [("lora on, base requests", lora_kwargs),
                  (f"lora on, {n} adapters", {**lora_kwargs, "loras": loras})]
    if args.compare_sync:
        specs.append((f"{label}, sync scheduling", {"async_scheduling": False}))
    rows = [(name, statistics.median(times), times)
            for name, times in time_engines(specs, model, prompts, args)]
    if args.compare_hf:
        secs = run_hf(model, prompts, args.output_len, dtype)
        rows.append(("transformers generate", secs, [secs]))
    n, out_tokens = len(prompts), len(prompts) * args.output_len
    base = rows[0][1]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nmodel {model} | device {device} | batch {n} | in {args.input_len} | "
          f"out {args.output_len} | dtype {args.dtype} | median of {args.repeats} "
          f"{'alternating ' if args.tensor_parallel_size == 1 else ''}runs")
    print(f"{'system':<26}{'seconds':>10}{'spread':>8}{'prompts/s':>12}{'out tok/s':>12}"
          f"{'vs first row':>14}")
    for name, secs, times in rows:
        spread = (max(times) - min(times)) / secs
        print(f"{name:<26}{secs:>10.3f}{spread:>7.0%} {n / secs:>11.2f}{out_tokens / secs:>12.1f}"
              f"{base / secs:>13.3f}x")


if __name__ == "__main__":
    main()
