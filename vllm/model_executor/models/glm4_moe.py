"""GLM-4.5 / GLM-4.5-Air: sigmoid router scores with a correction bias,
grouped top-k, routed scaling, always-on shared experts, dense MLP in the
first ``first_k_dense_replace`` layers, partial rotary, optional q/k norm.
Multi-token-prediction layers stored after the last decoder layer are
skipped at load."""
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.models.moe_transformer import (DecoderSpec, LayerSpec, MoEForCausalLM,
                                                        MoESpec, attention_spec)


class Glm4MoeForCausalLM(MoEForCausalLM):
    checkpoint_renames = [(".mlp.shared_experts.", ".mlp.shared_expert."),
                          (".mlp.gate.e_score_correction_bias",
                           ".mlp.experts.e_score_correction_bias")]

    @classmethod
    def decoder_spec(cls, cfg) -> DecoderSpec:
        moe = MoESpec(
            num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
            intermediate_size=cfg.moe_intermediate_size,
            router=RouterConfig(cfg.num_experts_per_tok, scoring="sigmoid",
                                renormalize=bool(cfg.norm_topk_prob),
                                num_expert_groups=cfg.n_group, topk_groups=cfg.topk_group,
                                routed_scaling_factor=float(cfg.routed_scaling_factor)),
            router_fp32=True, correction_bias=True,
            shared_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts)
        layers = [LayerSpec(moe=moe if i >= cfg.first_k_dense_replace else None,
                            dense_intermediate_size=cfg.intermediate_size)
                  for i in range(cfg.num_hidden_layers)]
        attention = attention_spec(cfg, qkv_bias=bool(cfg.attention_bias),
                                   qk_norm="head" if getattr(cfg, "use_qk_norm", False) else None)
        return DecoderSpec(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.hidden_act,
                           attention, layers, bool(cfg.tie_word_embeddings))
