"""Weight-only quantization of a (pruned or dense) text encoder on top of Skrr, through maintained libraries.

- ``int8`` / ``fp8``: torchao (``Int8WeightOnlyConfig``: per-output-channel int8; ``Float8WeightOnlyConfig``:
  float8 e4m3 with per-channel scales) on every ``nn.Linear``. Chosen over optimum-quanto because torchao 0.18
  installs here without moving the torch/transformers pins, runs on CPU as well as CUDA, is maintained by the
  PyTorch team and is what diffusers and transformers document (``TorchAoConfig``); optimum-quanto's last
  release is from 2025-03 and needs ninja to build its kernels.
- ``nf4``: bitsandbytes 4-bit NormalFloat (``Linear4bit``), CUDA only (its kernels); refused on CPU.

Embeddings and norms stay in their dtype (weight-only quantization of the projections, as the libraries do).
``weight_bytes`` counts the real bytes of every parameter, quantized ones by their stored parts.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("none", "int8", "fp8", "nf4")


class QuantizeError(ValueError):
    """A quantization mode that is unknown or cannot run here."""


def quiet_import_notices() -> None:
    """Silence torchao's import-time notices, which transformers' and diffusers' quantizers trigger whenever a model
    loads: torch calls its Enum pytree constants deprecated, diffusers cannot import some of its tensor classes
    (only torchao-serialized checkpoints need them). Not the user's to fix, and on stderr they would break the
    one-line contract of a bad input's error."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


def check_mode(mode: str | None, device: str | torch.device = "cpu") -> str:
    """The mode, validated for the device: one-line QuantizeError naming the fix otherwise."""
    mode = mode or "none"
    if mode not in MODES:
        raise QuantizeError(f"unknown quantize={mode!r}; choose one of {', '.join(MODES)}")
    if mode == "nf4" and torch.device(device).type != "cuda":
        raise QuantizeError("quantize=nf4 runs on CUDA only (bitsandbytes 4-bit kernels); use int8 or fp8 on CPU")
    return mode


def quantize_encoder(encoder: nn.Module, mode: str | None, device: str | torch.device | None = None) -> nn.Module:
    """Quantize the encoder's linear weights in place (``mode`` none|int8|fp8|nf4); returns it.

    Re-used units share one module, so a re-used projection is quantized once and still shared.
    """
    device = device if device is not None else next(encoder.parameters()).device
    mode = check_mode(mode, device)
    if mode == "none":
        return encoder
    if mode in ("int8", "fp8"):
        try:
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        except ImportError as err:
            raise QuantizeError(f"quantize={mode} needs torchao; pip install torchao==0.18.0") from err
        config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
        # A re-used unit's linear is reached once per position that runs it: quantize it the first time only.
        quantize_(encoder, config, filter_fn=lambda m, _: isinstance(m, nn.Linear)
                  and not hasattr(m.weight, "__tensor_flatten__"))
    else:
        _to_nf4(encoder, torch.device(device))
    encoder.skrr_quantize = mode
    log.info("quantized the text encoder's linear weights to %s: %d bytes", mode, weight_bytes(encoder))
    return encoder


def _to_nf4(encoder: nn.Module, device: torch.device) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise QuantizeError("quantize=nf4 needs bitsandbytes on a CUDA machine; pip install bitsandbytes") from err
    done: dict[int, nn.Module] = {}  # a re-used unit's linear is replaced once and stays shared
    for parent in list(encoder.modules()):
        for name, child in list(parent._modules.items()):
            if not isinstance(child, nn.Linear):
                continue
            if id(child) not in done:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=child.weight.dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.data, requires_grad=False)
                done[id(child)] = new.to(device)  # Params4bit quantizes when moved to CUDA
            parent._modules[name] = done[id(child)]


def is_quantized(t: torch.Tensor) -> bool:
    """Whether a parameter is stored quantized (a torchao tensor subclass or a bitsandbytes 4-bit tensor)."""
    return (hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter)) or \
        getattr(t, "quant_state", None) is not None


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really occupies: a quantized one by its stored parts (packed data, scales, zero points)."""
    return _tensor_bytes(t)[0]


def _tensor_bytes(t: torch.Tensor) -> tuple[int, list[tuple[int, int]]]:
    """(bytes, storage keys) of a tensor, following tensor subclasses (torchao) to their stored parts."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        total, keys = 0, []
        for n in names:
            b, k = _tensor_bytes(getattr(t, n))
            total += b
            keys += k
        return total, keys
    quant_state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: packed data + absmax per block
    extra = 0
    if quant_state is not None and getattr(quant_state, "absmax", None) is not None:
        extra = quant_state.absmax.numel() * quant_state.absmax.element_size()
    key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
    return t.numel() * t.element_size() + extra, [key]


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters as stored (quantized parts included), shared tensors counted once."""
    seen: set = set()
    total = 0
    for p in module.parameters():
        b, keys = _tensor_bytes(p)
        if keys and keys[0] in seen:
            continue
        seen.update(keys)
        total += b
    return total
