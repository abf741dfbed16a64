"""Table 2's cost columns for a (pruned) pipeline: parameters, memory, TFLOPs per image (SPEC §1, §6).

- Params: text encoder(s) + denoiser + VAE decoder path (``post_quant_conv`` + ``decoder``; the encoder half
  of the VAE never runs in text-to-image), shared tensors counted once (``skrr.count_params``). Dense
  PixArt-Σ: 4,762,310,656 + 610,856,096 + 49,490,199 = 5.42 B.
- Memory ("Mem", Table 2): the bf16 byte count of those weights (params + buffers), as the paper defines the
  column (PixArt-Σ: 5.42 B x 2 bytes + buffers = 10.11 GiB; the paper prints 10.18), on every device.
  A text encoder quantized by ``quantize=int8|fp8|nf4`` (skrr/quantize.py) counts its quantized weights by
  their real stored bytes (int8/fp8 data + scales, nf4 packed data + absmax), the rest still in bf16: the
  column stays "the weights the pipeline must hold", and a quantized row is comparable with a bf16 one.
  Params stay the logical element count (quantization removes no parameter). On CUDA the peak allocated during the probe generation (weights + activations) is measured too and kept
  in its own field, ``peak_gib``; it is never put in the Mem column.
- TFLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` around every call the pipeline makes to
  each component during a short real run, then encoder calls + steps x denoiser calls + VAE decode. Under
  classifier-free guidance the pipeline encodes the negative prompt too and runs the denoiser on a batch
  of 2, and both are counted as they happen. FLOPs of a multiply-add count 2, as torch counts them.
  torch has flop formulas for the CUDA attention kernels (flash, efficient, cuDNN) but none for the fused
  CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``), MPS's or the "overrideable" one, which it
  would count as 0 (the tiny PixArt-Σ at 64x64: 130 M instead of 375 M FLOPs per image). Those get torch's own
  ``sdpa_flop_count`` (QK^T and AV matmuls, the count the CUDA kernels and the math backend give), so the
  number is the same on every device; the result records the device and this counting method.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from eval import EvalError
from eval.generate import GenerationSettings
from skrr import count_params
from skrr.quantize import is_quantized, stored_bytes

log = logging.getLogger(__name__)

GIB = 1024**3
TEXT_ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_KEYS = ("transformer", "unet")
MEMORY_KIND = ("bf16_weight_bytes_gib (the paper's Mem: weights in bf16, params + buffers; quantized text-encoder "
               "weights by their real stored bytes)")


def text_encoders(pipeline: Any) -> dict[str, nn.Module]:
    """The pipeline's text encoders by component name (PixArt: one T5; SD3: CLIP-L, CLIP-G, T5)."""
    found = {k: getattr(pipeline, k) for k in TEXT_ENCODER_KEYS if getattr(pipeline, k, None) is not None}
    if not found:
        raise EvalError(f"{type(pipeline).__name__} has no text_encoder component; pass a diffusers T2I pipeline")
    return found


def denoiser(pipeline: Any) -> nn.Module:
    """The pipeline's transformer or U-Net."""
    for k in DENOISER_KEYS:
        if getattr(pipeline, k, None) is not None:
            return getattr(pipeline, k)
    raise EvalError(f"{type(pipeline).__name__} has no transformer/unet component; pass a diffusers T2I pipeline")


def vae_decoder_modules(pipeline: Any) -> list[nn.Module]:
    """The modules ``vae.decode`` runs: ``post_quant_conv`` (when present) and ``decoder``."""
    vae = pipeline.vae
    return [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if isinstance(m, nn.Module)]


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return list(itertools.chain.from_iterable(m.parameters() for m in modules))


def _unique_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers, each storage once (a re-used unit holds the same tensors twice)."""
    seen, out = set(), []
    for t in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules):
        # A quantized weight (torchao subclass) has no storage of its own; a re-used one is the same object.
        key = id(t) if t.device.type == "meta" or is_quantized(t) else (t.untyped_storage().data_ptr(),
                                                                       t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def pipeline_params(pipeline: Any) -> dict[str, int]:
    """Parameter counts: each text encoder, denoiser, VAE decoder path, and the total with shared tensors once."""
    encoders = text_encoders(pipeline)
    parts = {**encoders, "denoiser": denoiser(pipeline)}
    counts = {k: count_params(m) for k, m in parts.items()}
    dec = vae_decoder_modules(pipeline)
    counts["vae_decoder"] = count_params(_params(dec))
    counts["total"] = count_params(_params([*parts.values(), *dec]))
    return counts


def weight_bytes(pipeline: Any, bytes_per_element: int | None = None) -> int:
    """Bytes of the weights that count (params + buffers); ``bytes_per_element`` overrides the stored dtype of the
    unquantized ones, a quantized weight counts its real stored bytes."""
    modules = [*text_encoders(pipeline).values(), denoiser(pipeline), *vae_decoder_modules(pipeline)]
    return sum(stored_bytes(t) if is_quantized(t) else t.numel() * (bytes_per_element or t.element_size())
               for t in _unique_tensors(modules))


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """torch's count for an SDPA call (two matmuls), for the fused kernels torch has no formula for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Fused attention ops whose FLOPs FlopCounterMode would count as 0 (torch 2.x registers only the CUDA ones).
_UNCOUNTED_ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math_for_mps",
                        "_scaled_dot_product_fused_attention_overrideable")
ATTENTION_FLOPS = {getattr(torch.ops.aten, n): _sdpa_flops for n in _UNCOUNTED_ATTENTION if hasattr(torch.ops.aten, n)}
FLOPS_METHOD = ("torch.utils.flop_counter.FlopCounterMode; fused SDPA kernels without a torch formula "
                "(CPU, MPS) counted by torch's sdpa_flop_count, as the CUDA kernels and the math backend are")


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that counts attention on every device (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)


@contextmanager
def _counting(obj: Any, method: str, tally: dict[str, float], key: str) -> Iterator[None]:
    """Wrap ``obj.<method>``: each call adds its FLOPs to ``tally[key]`` and 1 to ``tally[key + '_calls']``."""
    original = getattr(obj, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with flop_counter() as counter:
            out = original(*args, **kwargs)
        tally[key] += counter.get_total_flops()
        tally[key + "_calls"] += 1
        return out

    setattr(obj, method, wrapper)  # instance attribute shadows the class method; removed below
    try:
        yield
    finally:
        delattr(obj, method)


@dataclass(frozen=True)
class CostResult:
    """Table 2's columns plus their breakdown."""

    params: dict[str, int]
    params_b: float
    memory_gib: float
    memory_kind: str
    weights_gib_bf16: float
    tflops: float
    flops_breakdown: dict[str, float] = field(default_factory=dict)
    peak_gib: float | None = None
    peak_kind: str = "not measured (no CUDA)"
    flops_device: str = "cpu"
    flops_method: str = FLOPS_METHOD
    quantize: dict[str, str] = field(default_factory=dict)  # text encoder -> none|int8|fp8|nf4 (skrr/quantize.py)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@torch.inference_mode()
def measure_cost(pipeline: Any, settings: GenerationSettings = GenerationSettings(), prompt: str = "a photo of a cat",
                 device: str | torch.device | None = None, probe_steps: int = 2) -> CostResult:
    """Params, memory and TFLOPs per image of ``pipeline`` at ``settings`` (one short real run of ``probe_steps``)."""
    if device is not None:
        pipeline.to(device)
    dev = torch.device(device) if device is not None else next(denoiser(pipeline).parameters()).device
    tally: dict[str, float] = {k: 0.0 for k in ("encoder", "encoder_calls", "denoiser", "denoiser_calls",
                                                "vae_decoder", "vae_decoder_calls")}
    steps = min(probe_steps, settings.num_inference_steps)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with ExitStack() as stack:
        for enc in text_encoders(pipeline).values():
            stack.enter_context(_counting(enc, "forward", tally, "encoder"))
        stack.enter_context(_counting(denoiser(pipeline), "forward", tally, "denoiser"))
        stack.enter_context(_counting(pipeline.vae, "decode", tally, "vae_decoder"))
        pipeline(prompt=[prompt], height=settings.height, width=settings.width, num_inference_steps=steps,
                 guidance_scale=settings.guidance_scale, num_images_per_prompt=1,
                 generator=[torch.Generator("cpu").manual_seed(settings.seed)], output_type="pil",
                 **dict(settings.call_kwargs))
    if tally["denoiser_calls"] == 0:
        raise EvalError(f"{type(pipeline).__name__} never called its denoiser; check the pipeline call settings")
    per_call = tally["denoiser"] / tally["denoiser_calls"]
    calls_per_step = tally["denoiser_calls"] / steps
    denoise_total = per_call * calls_per_step * settings.num_inference_steps
    flops = tally["encoder"] + denoise_total + tally["vae_decoder"]
    params = pipeline_params(pipeline)
    bf16 = weight_bytes(pipeline, bytes_per_element=2) / GIB
    peak, peak_kind = None, "not measured (no CUDA)"
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / GIB
        peak_kind = (f"cuda_peak_allocated_gib ({torch.cuda.get_device_name(dev)}, one {settings.height}x"
                     f"{settings.width} generation, weights in {next(denoiser(pipeline).parameters()).dtype})")
    breakdown = {"encoder_tflops": tally["encoder"] / 1e12, "encoder_calls": tally["encoder_calls"],
                 "denoiser_tflops_per_call": per_call / 1e12, "denoiser_calls_per_step": calls_per_step,
                 "steps": settings.num_inference_steps, "denoiser_tflops": denoise_total / 1e12,
                 "vae_decoder_tflops": tally["vae_decoder"] / 1e12, "height": settings.height,
                 "width": settings.width, "guidance_scale": settings.guidance_scale}
    log.info("cost: %.3f B params, %.2f GiB bf16 weights (peak %s), %.2f TFLOPs/image on %s", params["total"] / 1e9,
             bf16, "n/a" if peak is None else f"{peak:.2f} GiB", flops / 1e12, dev)
    quantize = {k: getattr(m, "skrr_quantize", "none") for k, m in text_encoders(pipeline).items()}
    return CostResult(params, params["total"] / 1e9, bf16, MEMORY_KIND, bf16, flops / 1e12, breakdown, peak, peak_kind,
                      str(dev), FLOPS_METHOD, quantize)

