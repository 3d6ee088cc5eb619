"""Write a quantized copy of a float checkpoint in an exact on-disk format.

    python -m vllm.tools.quantize --scheme fp8-block|fp8-ct|nvfp4|nvfp4-modelopt|int4-ct|mxfp4 IN OUT

Schemes:
- ``fp8-block``: Hugging Face ``fp8`` (``weight`` E4M3 + ``weight_scale_inv``
  per ``--block-size`` block, dynamic per-token-group activations);
- ``fp8-ct``: compressed-tensors ``float-quantized``; ``--fp8-weights``
  tensor | channel | block, ``--fp8-acts`` dynamic (per token; per group for
  block weights) | static (per-tensor scales calibrated on a few built-in
  texts) | none;
- ``int4-ct``: compressed-tensors ``pack-quantized`` symmetric INT4 W4A16,
  ``--group-size`` 32 or 128;
- ``nvfp4``: compressed-tensors ``nvfp4-pack-quantized`` (NVFP4A16: E2M1,
  E4M3 scales per 16 values, per-tensor global scale);
- ``nvfp4-modelopt``: the same values in ModelOpt's layout
  (``hf_quant_config.json``, ``weight_scale_2``, ``input_scale``);
- ``mxfp4``: GPT-OSS experts as ``*_blocks`` / ``*_scales`` (E2M1, E8M0 per
  32 values); everything else stays float.

The linear projections of attention, dense MLPs, shared and routed experts
are quantized; embeddings, LM head, routers, gates, norms and biases stay
in the source dtype (and are listed as ignored in the config). Meant for
tests and experiments on small models: scales are plain max-abs, no GPTQ.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

SCHEMES = ("fp8-block", "fp8-ct", "int4-ct", "nvfp4", "nvfp4-modelopt", "mxfp4")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# per-projection linear weights that get quantized (HF checkpoint names)
_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3)"
                   r"\.weight$")
_STACKED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
# modules that stay float, as ignore patterns per config flavour
_CT_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*router$", "re:.*shared_expert_gate$"]
_GLOB_IGNORE = ["lm_head", "model.embed_tokens", "model.layers.*.mlp.gate",
                "model.layers.*.mlp.router", "model.layers.*.mlp.shared_expert_gate"]


# -- value quantizers ---------------------------------------------------------------

def _blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = w.shape
    pad = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
    return pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)


def quantize_fp8(w: torch.Tensor, granularity: str,
                 block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, float32 scale): scale ``[1]``, ``[N, 1]`` or
    ``[ceil(N / bn), ceil(K / bk)]``, with ``w ~= q * scale``."""
    w = w.float()
    if granularity == "tensor":
        scale = (w.abs().amax().clamp(min=1e-12) / FP8_MAX).reshape(1)
        full = scale
    elif granularity == "channel":
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        full = scale
    elif granularity == "block":
        bn, bk = block
        scale = _blocks(w, bn, bk).abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
        full = scale.repeat_interleave(bn, 0)[:w.shape[0]].repeat_interleave(bk, 1)[:, :w.shape[1]]
    else:
        raise ValueError(f"unknown FP8 granularity {granularity!r}")
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (sign in bit 3) of each value (already scaled)."""
    mags = E2M1_MAGNITUDES.to(x.device)
    idx = (x.abs().clamp(max=6.0).unsqueeze(-1) - mags).abs().argmin(dim=-1)
    return idx | ((x < 0).long() << 3)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int codes ``[N, K]`` -> uint8 ``[N, K / 2]``, low nibble = even element."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 in compressed-tensors' packing: (int32 ``[N, K / 8]``
    with value + 8 in nibble ``k % 8`` of word ``k // 8``, scale ``[N, K / g]``)."""
    n, k = w.shape
    if k % group or k % 8:
        raise ValueError(f"input dim {k} is not a multiple of the group size {group} and of 8")
    g = w.float().view(n, k // group, group)
    scale = g.abs().amax(dim=-1).clamp(min=1e-12) / 7.0
    q = torch.round(g / scale.unsqueeze(-1)).clamp(-8, 7).view(n, k).long() + 8
    words = torch.zeros(n, k // 8, dtype=torch.int64)
    for i in range(8):
        words |= q[:, i::8] << (4 * i)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32), scale


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 E2M1 pairs ``[N, K / 2]``, E4M3 scales ``[N, K / 16]``, global
    scale ``[1]``) with ``w ~= e2m1 * scale / global`` (compressed-tensors'
    convention; ModelOpt stores ``1 / global`` as ``weight_scale_2``)."""
    n, k = w.shape
    if k % 16:
        raise ValueError(f"input dim {k} is not a multiple of 16")
    w = w.float()
    global_scale = (FP8_MAX * 6.0 / w.abs().amax().clamp(min=1e-12)).reshape(1)
    g = w.view(n, k // 16, 16)
    scale = (g.abs().amax(dim=-1) / 6.0 * global_scale).clamp(max=FP8_MAX).to(FP8)
    denom = (scale.float() / global_scale).clamp(min=1e-30).unsqueeze(-1)
    codes = _e2m1_codes(g / denom).view(n, k)
    return _pack_nibbles(codes), scale, global_scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 blocks ``[N, K / 32, 16]``, E8M0 scales ``[N, K / 32]``)."""
    n, k = w.shape
    if k % 32:
        raise ValueError(f"input dim {k} is not a multiple of 32")
    g = w.float().view(n, k // 32, 32)
    amax = g.abs().amax(dim=-1).clamp(min=2.0 ** -120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    codes = _e2m1_codes(g / torch.exp2(exp).unsqueeze(-1)).view(n, k)
    return _pack_nibbles(codes).view(n, k // 32, 16), (exp + 127).to(torch.uint8)


# -- calibration for static FP8 activation scales --------------------------------------

CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving engines batch requests continuously while others decode.",
    "def add(a, b):\n    return a + b",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 and unicode café 日本語",
]


@torch.no_grad()
def calibrate_input_amax(src: str) -> dict[str, float]:
    """Max |input| of every quantized projection over the calibration texts,
    by checkpoint module name (expert inputs over all tokens, routed or not)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    disk_moe = "block_sparse_moe" if model.config.model_type == "mixtral" else "mlp"
    amax: dict[str, float] = {}

    def note(name: str, value: torch.Tensor) -> None:
        amax[name] = max(amax.get(name, 0.0), float(value.abs().max()))

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _PROJ.search(name + ".weight"):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, n=name: note(n, args[0])))
        elif hasattr(module, "gate_up_proj") and name.endswith(".experts"):
            def expert_hook(m, args, n=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                disk = n.replace(".mlp.", f".{disk_moe}.")
                names = ("w1", "w3", "w2") if disk_moe == "block_sparse_moe" else \
                    ("gate_proj", "up_proj", "down_proj")
                for e in range(m.gate_up_proj.shape[0]):
                    gate, up = (x @ m.gate_up_proj[e].float().T).chunk(2, dim=-1)
                    h = m.act_fn(gate) * up
                    note(f"{disk}.{e}.{names[0]}", x)
                    note(f"{disk}.{e}.{names[1]}", x)
                    note(f"{disk}.{e}.{names[2]}", h)
            hooks.append(module.register_forward_pre_hook(expert_hook))
    for text in CALIBRATION_TEXTS:
        model(torch.tensor([tok.encode(text)]))
    for h in hooks:
        h.remove()
    return amax


# -- checkpoint writing ----------------------------------------------------------------

def _load_checkpoint(src: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} has no *.safetensors files")
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(src, f)))
    return tensors


def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(**kw)


def _ct_config(fmt: str, weights, acts) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts,
                                format=fmt)
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                             quantization_status="compressed", ignore=list(_CT_IGNORE))
    out = json.loads(cfg.model_dump_json(exclude_none=True))
    out["quant_method"] = "compressed-tensors"
    return out


def quantize_checkpoint(src: str, dst: str, scheme: str, *, block: tuple[int, int] = (128, 128),
                        group_size: int = 128, fp8_weights: str = "channel",
                        fp8_acts: str = "dynamic") -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown --scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    gpt_oss = config.get("model_type") == "gpt_oss"
    if (scheme == "mxfp4") != gpt_oss:
        raise ValueError("--scheme mxfp4 writes GPT-OSS checkpoints only (and GPT-OSS is "
                         "quantized with mxfp4 only: its experts are stacked on disk)")
    tensors = _load_checkpoint(src)
    static = scheme == "fp8-ct" and fp8_acts == "static"
    amax = calibrate_input_amax(src) if static else {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if scheme == "mxfp4":
            m = _STACKED.search(name)
            if m and t.dim() == 3:
                w = t.transpose(1, 2)  # GPT-OSS stores [E, in, out]
                parts = [quantize_mxfp4(w[e]) for e in range(w.shape[0])]
                out[name + "_blocks"] = torch.stack([b for b, _ in parts])
                out[name + "_scales"] = torch.stack([s for _, s in parts])
            else:
                out[name] = t
            continue
        if not (_PROJ.search(name) and t.dim() == 2):
            out[name] = t
            continue
        module = name[:-len(".weight")]
        if scheme == "fp8-block":
            q, s = quantize_fp8(t, "block", block)
            out[name], out[module + ".weight_scale_inv"] = q, s
        elif scheme == "fp8-ct":
            q, s = quantize_fp8(t, fp8_weights, block)
            out[name], out[module + ".weight_scale"] = q, s
            if static:
                out[module + ".input_scale"] = torch.tensor(
                    [max(amax[module], 1e-6) / FP8_MAX], dtype=torch.float32)
        elif scheme == "int4-ct":
            packed, s = quantize_int4(t, group_size)
            out[module + ".weight_packed"] = packed
            out[module + ".weight_scale"] = s.to(t.dtype)
            out[module + ".weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int32)
        else:
            packed, s, g = quantize_nvfp4(t)
            if scheme == "nvfp4":
                out[module + ".weight_packed"] = packed
                out[module + ".weight_scale"] = s
                out[module + ".weight_global_scale"] = g
            else:
                out[name] = packed
                out[module + ".weight_scale"] = s
                out[module + ".weight_scale_2"] = (1.0 / g).reshape(())
                out[module + ".input_scale"] = torch.ones((), dtype=torch.float32)

    if scheme == "fp8-block":
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": list(block), "modules_to_not_convert": list(_GLOB_IGNORE)}
    elif scheme == "fp8-ct":
        wargs = dict(num_bits=8, type="float", symmetric=True, dynamic=False,
                     strategy=fp8_weights)
        if fp8_weights == "block":
            wargs["block_structure"] = list(block)
        if fp8_acts == "none":
            acts = None
        elif fp8_acts == "static":
            acts = _ct_args(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy="tensor")
        elif fp8_weights == "block":
            acts = _ct_args(num_bits=8, type="float", symmetric=True, dynamic=True,
                            strategy="group", group_size=block[1])
        else:
            acts = _ct_args(num_bits=8, type="float", symmetric=True, dynamic=True,
                            strategy="token")
        qc = _ct_config("float-quantized", _ct_args(**wargs), acts)
    elif scheme == "int4-ct":
        qc = _ct_config("pack-quantized", _ct_args(num_bits=4, type="int", symmetric=True,
                                                    strategy="group", group_size=group_size,
                                                    dynamic=False), None)
    elif scheme == "nvfp4":
        qc = _ct_config("nvfp4-pack-quantized", _ct_args(
            num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
            dynamic=False, scale_dtype=FP8, zp_dtype=FP8), None)
    elif scheme == "mxfp4":
        qc = {"quant_method": "mxfp4",
              "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                         "model.embed_tokens", "lm_head"]}
    else:
        qc = None

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not (f.endswith(".safetensors") or f in ("model.safetensors.index.json", "config.json")):
            path = os.path.join(src, f)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(dst, f))
    if qc is not None:
        config["quantization_config"] = qc
    else:
        with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.0.0"},
                       "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                        "group_size": 16,
                                        "exclude_modules": list(_GLOB_IGNORE)}}, f, indent=2)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("input", help="float checkpoint directory")
    parser.add_argument("output", help="output directory")
    parser.add_argument("--block-size", type=int, nargs=2, default=[128, 128],
                        metavar=("N", "K"), help="FP8 block size (fp8-block, fp8-ct block)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                        help="INT4 group size")
    parser.add_argument("--fp8-weights", default="channel", choices=["tensor", "channel", "block"])
    parser.add_argument("--fp8-acts", default="dynamic", choices=["dynamic", "static", "none"])
    args = parser.parse_args(argv)
    path = quantize_checkpoint(args.input, args.output, args.scheme,
                               block=tuple(args.block_size), group_size=args.group_size,
                               fp8_weights=args.fp8_weights, fp8_acts=args.fp8_acts)
    print(f"wrote {args.scheme} checkpoint to {path}")


if __name__ == "__main__":
    main()
