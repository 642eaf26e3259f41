"""One weight into compressed-tensors' pack-quantized tensors, and the transform that packs a checkpoint's targets as they are written.

Everything here is compressed-tensors' own code (its qparams, its packing), so the bytes are
exactly its format; `slimming.quantize` decides which tensors are packed, at which bit width.
"""

from __future__ import annotations

import torch


def quant_scheme(bits: int, group_size: int, symmetric: bool, targets: list[str] | None = None):
    """compressed-tensors' scheme of integer weights at `bits`, per group (or per output row when `group_size` is 0)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric,
        strategy="group" if group_size else "channel", group_size=group_size or None,
    )
    return QuantizationScheme(targets=targets or ["Linear"], weights=args)


def rtn_parameters(weight: torch.Tensor, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zero points of one 2-D weight: min-max per group (or output row),
    computed by compressed-tensors' own `calculate_qparams`."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    value = weight.float()
    if args.group_size:
        grouped = value.unflatten(-1, (value.shape[-1] // args.group_size, args.group_size))
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        low, high = value.amin(dim=-1, keepdim=True), value.amax(dim=-1, keepdim=True)
    return calculate_qparams(low, high, args)


def compress_weight(weight: torch.Tensor, scheme, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One 2-D weight -> compressed-tensors' pack-quantized tensors (weight_packed, weight_scale, weight_shape[, zero point]).

    With `scale` (and `zero_point`) given -- calibrated rounding, whose rounded values `weight`
    already lies on that grid -- packing reproduces those integers; without, round-to-nearest.
    compressed-tensors' own packing, so the bytes are exactly its format.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat

    if scale is None:
        scale, zero_point = rtn_parameters(weight, scheme)
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    state = {"weight": weight.float(), "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}
    compressor = BaseCompressor.get_value_from_registry(CompressionFormat.pack_quantized.value)
    # clone, not contiguous(): a contiguous view would keep its whole intermediate buffer alive
    return {k: v.clone() for k, v in compressor.compress(state, scheme).items()}


class QuantizingTransform:
    """Rewrites each group of checkpoint tensors on its way to disk: every target `<module>.weight`
    becomes its compressed tensors, packed by its own scheme (`schemes`: key -> scheme); the rest passes.

    The same transform serves the in-memory and the streamed save, so both write the same bytes.
    It counts the bytes it was handed: the size the checkpoint would have had unquantised.
    """

    def __init__(self, schemes: dict, rounded: dict):
        self.schemes, self.rounded = schemes, rounded
        self.bytes_before = 0

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewritten: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            self.bytes_before += tensor.numel() * tensor.element_size()
            if key in self.schemes:
                module = key.removesuffix("weight")
                value, scale, zero_point = self.rounded.get(key, (tensor, None, None))
                rewritten.update({module + name: v for name, v in compress_weight(value, self.schemes[key], scale, zero_point).items()})
            else:
                rewritten[key] = tensor
        return rewritten
