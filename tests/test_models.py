"""Hugging Face parity of every architecture: prefill logits and greedy text."""
import pytest
import torch

from tests.utils import (ARCHS, PROMPTS, assert_greedy_consistent, engine_prefill_logits,
                         hf_logits, hf_model, model_dir, relative_max_error)
from vllm import LLM, SamplingParams

VARIANTS = [(arch, {}) for arch in ARCHS + ["glm4_moe", "gpt_oss"]] + [
    # dense layers between sparse ones, tied embeddings
    ("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 2,
                   "tie_word_embeddings": True}),
    # unnormalised top-k, q/k/v biases on
    ("qwen3_moe", {"norm_topk_prob": False, "attention_bias": True}),
    # sliding-window attention shorter than the prompts
    ("mixtral", {"sliding_window": 6}),
    ("olmoe", {"clip_qkv": 0.5}),
    # GLM without grouping, full rotary, no q/k norm
    ("glm4_moe", {"n_group": 1, "topk_group": 1, "use_qk_norm": False,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
]


@pytest.fixture(scope="module", params=VARIANTS,
                ids=lambda v: v[0] + "".join(f"-{k}" for k in v[1]))
def variant(request, tmp_path_factory):
    arch, overrides = request.param
    path = model_dir(str(tmp_path_factory.getbasetemp()), arch, **overrides)
    llm = LLM(path, dtype="float32", max_model_len=256)
    return path, llm


def test_prefill_logits_match_hf(variant):
    path, llm = variant
    tok = llm.get_tokenizer()
    for prompt in PROMPTS[:4]:
        ids = tok.encode(prompt)
        ours = engine_prefill_logits(llm, ids)
        ref = hf_logits(path, ids)
        assert relative_max_error(ours, ref) < 1e-4


def test_greedy_generation_matches_hf(variant):
    path, llm = variant
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    exact = 0
    for prompt, out in zip(PROMPTS, outputs):
        ids = tok.encode(prompt)
        ours = out.outputs[0].token_ids
        assert len(ours) == 16
        ref = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                                      do_sample=False)[0, len(ids):].tolist()
        if ours == ref:
            exact += 1
        else:
            assert_greedy_consistent(path, ids, ours)
    # ties are rare: most sequences must be identical outright
    assert exact >= len(PROMPTS) - 2


def test_checkpoint_is_streamed_from_shards(tmp_path):
    """A sharded checkpoint (index + several files) loads to the same model."""
    from transformers import AutoModelForCausalLM
    src = model_dir(str(tmp_path), "qwen2_moe")
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / name).write_bytes((tmp_path / "qwen2_moe" / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    llm = LLM(str(sharded), dtype="float32", max_model_len=128)
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    assert relative_max_error(engine_prefill_logits(llm, ids), hf_logits(src, ids)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS + ["glm4_moe", "gpt_oss"])
def test_gpu_engine_matches_hf(arch, tmp_path_factory):
    """The CUDA path (Triton attention and experts) in float32 against HF on CPU."""
    path = model_dir(str(tmp_path_factory.getbasetemp()), arch)
    llm = LLM(path, dtype="float32", device="cuda", max_model_len=256)
    moe = next(layer.mlp for layer in llm.llm_engine.runner.model.model.layers
               if hasattr(layer.mlp, "experts"))  # GLM-4.5 starts with dense layers
    assert moe.experts.quant_method.kernel.experts.name == "triton"
    tok = llm.get_tokenizer()
    for prompt in PROMPTS[:4]:
        ids = tok.encode(prompt)
        assert relative_max_error(engine_prefill_logits(llm, ids), hf_logits(path, ids)) < 1e-4
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert_greedy_consistent(path, tok.encode(prompt), out.outputs[0].token_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_triton_experts_engine_bf16(arch, backend, tmp_path_factory):
    """bf16 on the GPU with each LoRA-capable experts backend, against the
    float32 reference: our error must be no larger than transformers' own
    bf16 error on the same GPU (bf16 keeps ~3 significant digits per op and
    an expert choice can flip on a near-tie, so a fixed bound would be a guess)."""
    from transformers import AutoModelForCausalLM
    path = model_dir(str(tmp_path_factory.getbasetemp()), arch)
    llm = LLM(path, dtype="bfloat16", device="cuda", max_model_len=256, moe_backend=backend)
    tok = llm.get_tokenizer()
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    for prompt in PROMPTS[:4]:
        ids = tok.encode(prompt)
        ref = hf_logits(path, ids)
        with torch.no_grad():
            theirs = hf16(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        ours = engine_prefill_logits(llm, ids)

        def err(x):
            return ((x - ref).norm() / ref.norm()).item()
        assert err(ours) <= 1.5 * err(theirs) + 1e-3, (err(ours), err(theirs))


def test_glm_mtp_layers_in_checkpoint_are_skipped(tmp_path):
    """GLM-4.5 checkpoints carry multi-token-prediction layers after the last
    decoder layer; loading ignores them."""
    import shutil
    from safetensors.torch import load_file, save_file
    src = model_dir(str(tmp_path), "glm4_moe")
    dst = tmp_path / "with_mtp"
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    n = 3  # the tiny GLM's num_hidden_layers
    for key in [k for k in weights if k.startswith("model.layers.2.")]:
        weights[key.replace("model.layers.2.", f"model.layers.{n}.")] = weights[key].clone()
    weights[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(weights, dst / "model.safetensors")
    llm = LLM(str(dst), dtype="float32", max_model_len=128)
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    assert relative_max_error(engine_prefill_logits(llm, ids), hf_logits(src, ids)) < 1e-4
