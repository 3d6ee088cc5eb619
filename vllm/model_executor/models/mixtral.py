"""Mixtral: every layer sparse, softmax top-k always renormalised; experts
on disk as ``block_sparse_moe.experts.e.w1/w3/w2``."""
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.models.moe_transformer import (DecoderSpec, LayerSpec, MoEForCausalLM,
                                                        MoESpec, attention_spec, layer_window)


class MixtralForCausalLM(MoEForCausalLM):
    checkpoint_renames = [(".block_sparse_moe.", ".mlp.")]
    expert_shards = {"w1": "w1", "w3": "w3", "w2": "w2"}

    @classmethod
    def decoder_spec(cls, cfg) -> DecoderSpec:
        moe = MoESpec(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
                      intermediate_size=cfg.intermediate_size,
                      router=RouterConfig(cfg.num_experts_per_tok, renormalize=True))
        layers = [LayerSpec(moe=moe, sliding_window=layer_window(cfg, i))
                  for i in range(cfg.num_hidden_layers)]
        return DecoderSpec(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.hidden_act,
                           attention_spec(cfg), layers, bool(cfg.tie_word_embeddings))
