"""Write a tiny, seeded, random-weight MoE checkpoint plus a real tokenizer.

    python -m vllm.tools.make_tiny_model --arch qwen3_moe --out /tmp/tiny

The checkpoint is written by transformers' own ``save_pretrained`` (so its
on-disk layout is exactly what the library produces) and the tokenizer is a
byte-level BPE trained with the ``tokenizers`` library on a small built-in
corpus that includes multi-byte characters. Weights are redrawn with
scales that give well-separated logits, so greedy comparisons are stable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes each token "
    "to a few expert networks and adds their weighted outputs.",
    "Low-rank adapters add a product of two thin matrices to a frozen weight, so many "
    "fine-tuned variants can share one base model in memory.",
    "Serving engines batch requests continuously: new prompts join while others decode, "
    "and the key-value cache is paged in fixed-size blocks.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048. Punctuation: ; : , . ! ? ( ) [ ] { } \" '",
    "Unicode: café naïve résumé Ångström — “quotes” 日本語のテキスト 中文 한국어 Ελληνικά "
    "русский 😀🚀✨ ½ ∑ ∞ → ✓",
    "hello world, hello there. user assistant system question answer reverse upper lower",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
]

# architecture -> (transformers config class, Hugging Face architecture name)
ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (a PreTrainedTokenizerFast) with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, eos_id: int, **overrides: Any):
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(sorted(ARCHS))}")
    config_cls, architecture = ARCHS[arch]
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, num_experts_per_tok=2, rms_norm_eps=1e-6,
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                  tie_word_embeddings=False)
    per_arch = {
        "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                          norm_topk_prob=True),
        "qwen2_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                          shared_expert_intermediate_size=48, norm_topk_prob=False),
        "mixtral": dict(num_local_experts=8, intermediate_size=32),
        "olmoe": dict(num_experts=8, intermediate_size=32, norm_topk_prob=False),
        # 3 layers: the first dense; 8 experts in 2 groups (pick 1); partial
        # rotary; q/k norm and q/k/v biases on
        "glm4_moe": dict(num_hidden_layers=3, n_routed_experts=8, moe_intermediate_size=32,
                         intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=2, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5}),
        # sliding window shorter than the test prompts on alternate layers;
        # YaRN rotary as the real checkpoints
        "gpt_oss": dict(num_local_experts=8, intermediate_size=32, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"],
                        attention_bias=True, swiglu_limit=7.0,
                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "truncate": False,
                                         "original_max_position_embeddings": 128,
                                         "rope_theta": 150000.0}),
    }[arch]
    kwargs = {**common, **per_arch, **overrides}
    if arch == "olmoe":
        kwargs.pop("head_dim")  # OLMoE derives it from hidden_size / heads
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = [architecture]
    return config


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: matrices ~ N(0, 1/fan_in), norm weights near 1,
    biases small, embeddings ~ N(0, 1). Routers get a larger scale so that
    different tokens pick different experts."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name and param.dim() == 1:
            value = 1.0 + 0.1 * noise
        elif param.dim() == 1 or name.endswith("bias") or name.endswith("sinks"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = noise
        else:
            scale = 1.0 / math.sqrt(param.shape[-1])
            if name.endswith(("gate.weight", "router.weight")):
                scale *= 3.0
            value = noise * scale
        param.copy_(value.to(param.dtype))
    for name, buf in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):  # steers expert choice only
            buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def make_tiny_model(arch: str, out_dir: str, seed: int = 0, dtype: str = "float32",
                    **overrides: Any) -> str:
    """Write a tiny checkpoint of ``arch`` to ``out_dir`` and return the path."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = tiny_config(arch, len(tokenizer), eos_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model = model.to(getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id,
                     pad_token_id=eos_id).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--config-overrides", default="{}",
                        help='JSON of config fields, e.g. \'{"num_hidden_layers": 4}\'')
    args = parser.parse_args(argv)
    path = make_tiny_model(args.arch, args.out, args.seed, args.dtype,
                           **json.loads(args.config_overrides))
    print(f"wrote {args.arch} checkpoint to {path}")


if __name__ == "__main__":
    main()
