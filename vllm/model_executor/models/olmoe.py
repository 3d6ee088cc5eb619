"""OLMoE: q/k RMSNorm over the whole projection, optional q/k/v clipping."""
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.models.moe_transformer import (DecoderSpec, LayerSpec, MoEForCausalLM,
                                                        MoESpec, attention_spec)


class OlmoeForCausalLM(MoEForCausalLM):
    @classmethod
    def decoder_spec(cls, cfg) -> DecoderSpec:
        bias = getattr(cfg, "attention_bias", False)
        moe = MoESpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                      intermediate_size=cfg.intermediate_size,
                      router=RouterConfig(cfg.num_experts_per_tok,
                                          renormalize=bool(cfg.norm_topk_prob)))
        layers = [LayerSpec(moe=moe) for _ in range(cfg.num_hidden_layers)]
        return DecoderSpec(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.hidden_act,
                           attention_spec(cfg, qkv_bias=bias, o_bias=bias, qk_norm="full",
                                          clip_qkv=getattr(cfg, "clip_qkv", None)),
                           layers, bool(cfg.tie_word_embeddings))
