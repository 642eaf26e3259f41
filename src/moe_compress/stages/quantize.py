"""Weight-only quantisation to a compressed-tensors checkpoint (`slimming.quantize`), as a stage.

It is final: it writes the packed checkpoint that becomes the composition's output, and hands
the next measurement that checkpoint reloaded, so the report's last row is the quality of
exactly what was saved.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..preflight import Structure
from .options import QuantizeOptions
from .base import Job, Stage, StageContext, StageOutcome
from .footprint import Footprint
from .registry import register_stage


@register_stage
class Quantize(QuantizeOptions, Stage):
    """Save `model` with its weights quantised to `bits` (4 or 8), weight-only, as a compressed-tensors checkpoint."""

    kind: ClassVar[str] = "quantize"
    final: ClassVar[bool] = True
    positive: ClassVar[tuple[str, ...]] = ("iters",)
    routes_all_experts: ClassVar[bool] = True

    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        from ..slimming.quantize import check_quantize_options

        check_quantize_options(options["bits"], options["scope"], options["method"], options["group_size"],
                               calibrate_all_experts=options["calibrate_all_experts"])

    def run_one(self, model: str, tokenizer: Any, job: Job) -> Any:
        """From the checkpoint: round-to-nearest streams it as `job.streaming` says."""
        from ..slimming.quantize import quantize

        return quantize(model, job.out, **self.settings(), overwrite=job.overwrite, calib=job.calib, device=job.device,
                        trust_remote_code=job.trust_remote_code, streaming=job.streaming, dtype=job.dtype)

    def check(self, structure: Structure, earlier) -> None:
        from ..slimming.expert_bits import resolve_expert_bits
        from ..slimming.quantize import check_quantizable, check_quantize_options

        check_quantize_options(self.bits, self.scope, self.method, self.group_size, self.expert_bits, self.calibrate_all_experts)
        check_quantizable(structure.model, structure.adapter)
        if self.expert_bits is not None:  # against the input's layers (a pruning stage before may leave fewer experts: `run` checks again)
            from .drop import dropped_blocks

            gone = dropped_blocks(earlier)  # blocks dropped before renumber the layers expert_bits names
            alive = [i for i in range(len(structure.adapter.decoder_layers(structure.model))) if i not in gone]
            experts = {new: structure.experts[old] for new, old in enumerate(alive) if old in structure.experts}
            resolve_expert_bits(self.expert_bits, experts, len(alive), self.bits)

    def calibrates(self) -> str | None:
        if self.method != "autoround":
            return None
        return "tune the rounding of each decoder block with AutoRound" + (", every token routed to every expert" if self.calibrate_all_experts else "")

    def explain(self, structure: Structure) -> list[str]:
        from ..arch.table import experts_stored_per_expert
        from ..slimming.quantize import SCOPES

        group = ("one scale per output row" if self.group_size == 0 else f"groups of {self.group_size}" if self.group_size
                 else "the largest group of 128/64/32/16/8 dividing every width")
        rounding = "AutoRound-tuned rounding" if self.method == "autoround" else "round-to-nearest (no calibration)"
        lines = [f"would quantise {SCOPES[self.scope]} to {self.bits} bits ({'symmetric' if self.symmetric else 'asymmetric'}, {group}) "
                 f"by {rounding}, and write a compressed-tensors pack-quantized checkpoint"]
        if not experts_stored_per_expert(structure.model, structure.adapter):
            lines.append("the family fuses experts on disk: they would be packed one weight per expert, with the generated code that "
                         "stacks them back on load (trust_remote_code=True)")
        return lines

    def predict(self, footprint: Footprint) -> Footprint:
        """The routed experts at `bits`, or at their `expert_bits` (numbered as earlier block drops leave the layers), and with scope "all" the other decoder
        weights at `bits` (exact with the default group size, where `CheckpointSizes.others` knows them)."""
        from ..slimming.expert_bits import resolve_expert_bits

        result = footprint.with_bits(self.bits)
        if self.expert_bits is not None:  # keyed by the layers as the dropped blocks left them; the footprint by the original's
            named = {footprint.original_layer(layer): value for layer, value in self.expert_bits.items()} if footprint.dropped_blocks else self.expert_bits
            result = result.with_expert_widths(resolve_expert_bits(named, result.keep, len(result.sizes.blocks), self.bits))
        if self.scope == "all":
            result = result.with_other_bits(self.bits)
        return result if self.group_size is None else result.with_keep(result.keep, exact=False)

    def run(self, context: StageContext) -> StageOutcome:
        from ..arch.registry import get_adapter
        from ..arch.size import model_size
        from ..source.load import load_model
        from ..slimming.quantize import quantize

        size = model_size(context.model, get_adapter(context.model))
        result = quantize(context.model, context.scratch / "checkpoint", tokenizer=context.tokenizer, overwrite=True, calib=context.batches,
                          device=context.device, **self.settings())
        reloaded, _ = load_model(result.output_dir, device=context.device)
        info = {key: result.summary[key] for key in ("method", "bits", "group_size", "scope", "quantized_params", "checkpoint_bytes")}
        # The reloaded model holds packed int32 weights, so counting it would misstate the model:
        # report the logical parameter counts and the bytes as stored (these override the measurement).
        info |= {"params": size.total, "active_params": size.active_per_token, "bytes": result.summary["checkpoint_bytes"]}
        if "expert_bits" in result.summary:
            info["expert_bits"] = result.summary["expert_bits"]
        return StageOutcome(reloaded, None, info, checkpoint=result.output_dir)
