"""GPT-OSS: attention with learned per-head sinks, q/k/v/o biases, sliding
windows on alternate layers (``layer_types``), YaRN rotary scaling; a router
with bias (softmax over the top-k logits); experts stored fused and
transposed on disk (``gate_up_proj [E, H, 2I]`` with gate/up interleaved,
``down_proj [E, I, H]``, both with biases) and a clamped SwiGLU."""
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.models.moe_transformer import (DecoderSpec, LayerSpec, MoEForCausalLM,
                                                        MoESpec, attention_spec, layer_window)


class GptOssForCausalLM(MoEForCausalLM):
    checkpoint_renames = [(".mlp.router.", ".mlp.gate.")]
    fused_experts_transposed = True
    experts_out_in_layout = False
    moe_lora_fused_w13 = True

    @classmethod
    def decoder_spec(cls, cfg) -> DecoderSpec:
        moe = MoESpec(
            num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
            intermediate_size=cfg.intermediate_size,
            router=RouterConfig(cfg.num_experts_per_tok, scoring="topk_softmax"),
            # transformers 5.17 has no config.swiglu_alpha (its model fixes 1.702)
            activation=MoEActivation("swigluoai", interleaved=True,
                                     alpha=getattr(cfg, "swiglu_alpha", 1.702),
                                     limit=cfg.swiglu_limit),
            expert_bias=True, router_bias=True)
        layers = [LayerSpec(moe=moe, sliding_window=layer_window(cfg, i))
                  for i in range(cfg.num_hidden_layers)]
        bias = bool(cfg.attention_bias)
        attention = attention_spec(cfg, qkv_bias=bias, o_bias=bias, has_sinks=True)
        return DecoderSpec(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.hidden_act,
                           attention, layers, bool(cfg.tie_word_embeddings))
