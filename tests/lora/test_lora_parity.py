"""LoRA parity with merged-weight Hugging Face references (and PEFT itself
where PEFT loads the format), for every adapter format and architecture."""
import pytest
import torch

from tests.lora_utils import (merged_hf_model, peft_model, to_legacy_3d, write_peft_3d_adapter,
                              write_per_expert_adapter, write_shared_outer_adapter)
from tests.utils import PROMPTS, assert_greedy_consistent, model_dir, relative_max_error
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


def check_engine_against(llm, reference, prompts, lora_request):
    tok = llm.get_tokenizer()
    outs = llm.generate(prompts, GREEDY, lora_request=lora_request, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert_greedy_consistent(reference, tok.encode(prompt), c.token_ids, c.logprobs)
    return outs


def references_agree(path, adapter, prompt_ids):
    merged = merged_hf_model(path, adapter)
    with torch.no_grad():
        a = merged(torch.tensor([prompt_ids])).logits[0]
        b = peft_model(path, adapter)(torch.tensor([prompt_ids])).logits[0]
    assert relative_max_error(a, b) < 1e-4
    return merged


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


CASES = [
    # arch, model overrides, adapter kind, adapter kwargs, PEFT can load it
    ("qwen3_moe", {}, "per_expert", {}, True),
    ("qwen3_moe", {}, "peft_3d", {}, True),
    ("qwen3_moe", {}, "legacy_3d", {}, False),
    ("qwen3_moe", {}, "legacy_3d_no_version", {}, False),
    ("qwen3_moe", {}, "shared_outer", {}, False),
    ("qwen3_moe", {}, "per_expert", {"experts": ()}, True),                  # attention only
    ("qwen3_moe", {}, "per_expert", {"attention": ()}, True),                # experts only
    ("qwen3_moe", {}, "per_expert", {"rank_pattern": {"q_proj": 4, "down_proj": 12},
                                     "alpha_pattern": {"v_proj": 3.0}}, True),
    # PEFT 0.21 converts per-expert gate/up to one rank-2r factor with alpha 2a,
    # which under rsLoRA scales by 2a/sqrt(2r) instead of the trained
    # a/sqrt(r): PEFT itself is no reference for this one case.
    ("qwen3_moe", {}, "per_expert", {"use_rslora": True}, False),
    ("qwen3_moe", {}, "peft_3d", {"use_rslora": True}, True),
    # dense MLP layers next to MoE layers: PEFT 0.21 rewrites gate/up/down_proj
    # targets to the experts' parameters and silently drops the dense layers'
    # adapters, so only the merged reference holds here
    ("qwen3_moe", {"num_hidden_layers": 2, "mlp_only_layers": [0]}, "per_expert",
     {"dense": True}, False),
    ("qwen3_moe", {}, "peft_3d", {"params": ("down_proj",), "attention": ()}, True),
    ("mixtral", {}, "per_expert", {}, True),
    ("mixtral", {}, "peft_3d", {}, True),
    ("olmoe", {}, "per_expert", {"attention": ("q_proj", "k_proj", "v_proj", "o_proj")}, True),
    ("olmoe", {}, "peft_3d", {}, True),
    # on Qwen2-MoE PEFT matches gate/up/down_proj to the shared expert only and
    # drops the per-expert factors (FORMATS.md): merged reference only
    ("qwen2_moe", {}, "per_expert", {"shared": True}, False),
    ("qwen2_moe", {}, "peft_3d", {}, True),
    # per-expert names in target_modules: PEFT 0.21 maps gate/up/down_proj to
    # the routed experts and drops the shared experts' factors
    ("glm4_moe", {}, "per_expert", {"shared": True}, False),
    ("glm4_moe", {}, "peft_3d", {"modules": ("gate_proj", "up_proj", "down_proj")}, True),
    ("glm4_moe", {}, "peft_3d", {"router": True, "attention": ("k_proj",)}, True),
    # GPT-OSS: fused, transposed, interleaved experts (the fused-gate_up LoRA wrapper)
    ("gpt_oss", {}, "peft_3d", {"attention": ("q_proj", "k_proj", "v_proj", "o_proj")}, True),
    ("gpt_oss", {}, "peft_3d", {"params": ("gate_up_proj",), "router": True}, True),
    ("gpt_oss", {}, "legacy_3d", {}, False),
]


def make_adapter(kind, path, out, kwargs):
    if kind == "per_expert":
        return write_per_expert_adapter(path, out, **kwargs)
    if kind == "peft_3d":
        return write_peft_3d_adapter(path, out, **kwargs)
    if kind == "legacy_3d":
        return to_legacy_3d(write_peft_3d_adapter(path, out + "-src"), out, path)
    if kind == "legacy_3d_no_version":  # PEFT 0.17.x wrote no peft_version
        return to_legacy_3d(write_peft_3d_adapter(path, out + "-src"), out, path, None)
    if kind == "shared_outer":
        return write_shared_outer_adapter(path, out)
    raise ValueError(kind)


@pytest.mark.parametrize("arch,overrides,kind,kwargs,peft_loads", CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_adapter_matches_merged_reference(root, arch, overrides, kind, kwargs, peft_loads):
    path = model_dir(str(root), arch, **overrides)
    adapter = make_adapter(kind, path, str(root / f"ad-{arch}-{kind}-{abs(hash(str(kwargs)))}"),
                           kwargs)
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=16)
    tok = llm.get_tokenizer()
    if peft_loads:
        reference = references_agree(path, adapter, tok.encode(PROMPTS[1]))
    else:
        reference = merged_hf_model(path, adapter)
    lora = LoRARequest("a", 1, adapter)
    outs = check_engine_against(llm, reference, PROMPTS[:4], lora)
    # the adapter really changes the output (a test that cannot fail is a defect)
    base = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in base]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["per_expert", "peft_3d"])
def test_gpu_mixed_adapters_match_merged_reference(root, kind):
    """The CUDA path (Triton experts, Triton punica kernels) in float32, a
    batch mixing two adapters and the base model."""
    path = model_dir(str(root), "qwen3_moe")
    adapters = [make_adapter(kind, path, str(root / f"gpu-{kind}-{i}"), {"seed": i})
                for i in range(2)]
    llm = LLM(path, dtype="float32", device="cuda", max_model_len=256, enable_lora=True,
              max_loras=2, max_lora_rank=16)
    tok = llm.get_tokenizer()
    loras = [LoRARequest(f"a{i % 3}", i % 3 + 1, adapters[i % 3]) if i % 3 < 2 else None
             for i in range(6)]
    outs = llm.generate(PROMPTS[:6], GREEDY, lora_request=loras, use_tqdm=False)
    refs = [merged_hf_model(path, a) for a in adapters]
    for i, out in enumerate(outs):
        ref = path if loras[i] is None else refs[i % 3]
        c = out.outputs[0]
        assert_greedy_consistent(ref, tok.encode(PROMPTS[i]), c.token_ids, c.logprobs)


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager(root):
    """Decode through CUDA graphs gives the same tokens as eager execution,
    for base requests and adapter requests mixed in one batch."""
    path = model_dir(str(root), "qwen3_moe")
    adapters = [make_adapter("per_expert", path, str(root / f"graph-{i}"), {"seed": i})
                for i in range(2)]
    loras = [LoRARequest(f"a{i % 3}", i % 3 + 1, adapters[i % 3]) if i % 3 < 2 else None
             for i in range(len(PROMPTS))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(path, dtype="bfloat16", device="cuda", max_model_len=256, enable_lora=True,
                  max_loras=2, max_lora_rank=16, enforce_eager=eager)
        assert (llm.llm_engine.runner.graphs is None) == eager
        results.append([o.outputs[0].token_ids for o in
                        llm.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)])
        base_only = llm.generate(PROMPTS, params, use_tqdm=False)
        results.append([o.outputs[0].token_ids for o in base_only])
        del llm
    assert results[0] == results[2] and results[1] == results[3]


@pytest.mark.gpu
def test_gpu_graphs_follow_the_slot_adapters_layers(root, monkeypatch):
    """A LoRA decode graph records the kernels of the layers the adapters in
    the slots touch and no others; an adapter on other layers entering a
    slot gets a graph of its own, or, past the limit of layer sets, the
    graph of every LoRA layer. Tokens equal eager execution throughout."""
    from vllm.worker import cuda_graphs
    path = model_dir(str(root), "qwen3_moe")
    attention_only = write_per_expert_adapter(path, str(root / "graph-attn"), experts=(), seed=5)
    experts_only = write_per_expert_adapter(path, str(root / "graph-moe"), attention=(), seed=6)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = []
    for eager, max_sets in ((True, None), (False, 4), (False, 1)):
        monkeypatch.setattr(cuda_graphs, "MAX_LORA_LAYER_SETS", max_sets)
        llm = LLM(path, dtype="bfloat16", device="cuda", max_model_len=256, enable_lora=True,
                  max_loras=1, max_lora_rank=16, enforce_eager=eager)
        run = []
        for i, adapter in enumerate((attention_only, experts_only, attention_only)):
            lora = LoRARequest(f"a{i % 2}", i % 2 + 1, adapter)
            run.append([o.outputs[0].token_ids for o in
                        llm.generate(PROMPTS[:4], params, lora_request=lora, use_tqdm=False)])
        runs.append(run)
        if not eager:
            layer_sets = llm.llm_engine.runner.graphs.lora_layer_sets
            every_layer = frozenset(llm.llm_engine.runner.lora_manager.layers)
            expected = {frozenset({"qkv_proj"})} | (
                {frozenset({"experts"})} if max_sets > 1 else
                {frozenset(name.rsplit(".", 1)[-1] for name in every_layer)})
            assert {frozenset(name.rsplit(".", 1)[-1] for name in s) for s in layer_sets} == \
                expected
        del llm
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] != runs[0][1]  # the two adapters differ


@pytest.mark.parametrize("kind", ["per_expert", "peft_3d"])
def test_fused_w13_wrapper_matches_merged_reference(root, kind, monkeypatch):
    """The fused-gate_up LoRA wrapper (the one GPT-OSS uses) on a model whose
    experts are stored per expert: per-expert adapters become one rank-2r
    factor with a block-diagonal B, 3D adapters keep their shared A."""
    from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
    monkeypatch.setattr(Qwen3MoeForCausalLM, "moe_lora_fused_w13", True)
    path = model_dir(str(root), "qwen3_moe")
    adapter = make_adapter(kind, path, str(root / f"fused-{kind}"), {"rank": 4})
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=16)
    layers = llm.llm_engine.runner.lora_manager.layers.values()
    assert any(isinstance(layer, FusedMoE3DWithLoRA) for layer in layers)
    check_engine_against(llm, merged_hf_model(path, adapter), PROMPTS[:4],
                         LoRARequest("a", 1, adapter))


@pytest.mark.parametrize("arch", ["glm4_moe", "gpt_oss"])
def test_mixed_batch_new_architectures(root, arch):
    """Two adapters of different formats and the base model in one batch."""
    path = model_dir(str(root), arch)
    adapters = [make_adapter("peft_3d", path, str(root / f"mix-{arch}-0"),
                             {"seed": 7, "router": True}),
                make_adapter("per_expert" if arch == "glm4_moe" else "peft_3d", path,
                             str(root / f"mix-{arch}-1"), {"seed": 8, "rank": 8})]
    refs = [merged_hf_model(path, a) for a in adapters]
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
              max_lora_rank=16)
    tok = llm.get_tokenizer()
    loras = [LoRARequest(f"a{i % 3}", i % 3 + 1, adapters[i % 3]) if i % 3 < 2 else None
             for i in range(6)]
    outs = llm.generate(PROMPTS[:6], GREEDY, lora_request=loras, use_tqdm=False)
    for i, out in enumerate(outs):
        ref = path if loras[i] is None else refs[i % 3]
        c = out.outputs[0]
        assert_greedy_consistent(ref, tok.encode(PROMPTS[i]), c.token_ids, c.logprobs)


def test_fused_layout_rank_overflow_is_refused_at_load(root):
    """A per-expert adapter of rank 8 on a model whose expert LoRA is fused
    (GPT-OSS) needs rank 16 for gate+up: refused when the request arrives,
    with the reason, and the engine keeps serving."""
    from vllm.lora.peft import LoRAError
    path = model_dir(str(root), "gpt_oss")
    adapter = write_per_expert_adapter(path, str(root / "oss-per-expert"), rank=8, attention=())
    llm = LLM(path, dtype="float32", max_model_len=128, enable_lora=True, max_lora_rank=8)
    with pytest.raises(LoRAError, match="rank 16 .* above --max-lora-rank 8"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("a", 1, adapter),
                     use_tqdm=False)
    assert llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
