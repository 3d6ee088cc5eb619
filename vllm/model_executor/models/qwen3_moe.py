"""Qwen3-MoE: per-head q/k RMSNorm, softmax router (``norm_topk_prob``),
dense layers per ``mlp_only_layers`` / ``decoder_sparse_step``."""
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.models.moe_transformer import (DecoderSpec, LayerSpec, MoEForCausalLM,
                                                        MoESpec, attention_spec, is_sparse_layer,
                                                        layer_window)


def num_experts(cfg) -> int:
    # transformers 5 writes num_local_experts; Hub checkpoints say num_experts
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts


class Qwen3MoeForCausalLM(MoEForCausalLM):
    @classmethod
    def decoder_spec(cls, cfg) -> DecoderSpec:
        bias = getattr(cfg, "attention_bias", False)
        moe = MoESpec(num_experts=num_experts(cfg), top_k=cfg.num_experts_per_tok,
                      intermediate_size=cfg.moe_intermediate_size,
                      router=RouterConfig(cfg.num_experts_per_tok,
                                          renormalize=bool(cfg.norm_topk_prob)))
        layers = [LayerSpec(moe=moe if num_experts(cfg) > 0 and is_sparse_layer(cfg, i) else None,
                            dense_intermediate_size=cfg.intermediate_size,
                            sliding_window=layer_window(cfg, i))
                  for i in range(cfg.num_hidden_layers)]
        return DecoderSpec(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.hidden_act,
                           attention_spec(cfg, qkv_bias=bias, o_bias=bias, qk_norm="head"),
                           layers, bool(cfg.tie_word_embeddings))
