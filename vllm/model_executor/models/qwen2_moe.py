"""Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate."""
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.models.moe_transformer import (DecoderSpec, LayerSpec, MoEForCausalLM,
                                                        MoESpec, attention_spec, is_sparse_layer,
                                                        layer_window)
from vllm.model_executor.models.qwen3_moe import num_experts


class Qwen2MoeForCausalLM(MoEForCausalLM):
    @classmethod
    def decoder_spec(cls, cfg) -> DecoderSpec:
        moe = MoESpec(num_experts=num_experts(cfg), top_k=cfg.num_experts_per_tok,
                      intermediate_size=cfg.moe_intermediate_size,
                      router=RouterConfig(cfg.num_experts_per_tok,
                                          renormalize=bool(cfg.norm_topk_prob)),
                      shared_intermediate_size=cfg.shared_expert_intermediate_size,
                      shared_gate=True)
        layers = [LayerSpec(moe=moe if num_experts(cfg) > 0 and is_sparse_layer(cfg, i) else None,
                            dense_intermediate_size=cfg.intermediate_size,
                            sliding_window=layer_window(cfg, i))
                  for i in range(cfg.num_hidden_layers)]
        return DecoderSpec(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.hidden_act,
                           attention_spec(cfg, qkv_bias=getattr(cfg, "qkv_bias", True)),
                           layers, bool(cfg.tie_word_embeddings))
