"""When an export computes the same model as its source checkpoint: the tolerances ``qat eval`` enforces.

Measured on the tiny BitNet recipe (30 steps, max |logit| 4.9, 2,048 held-out tokens): HF BitNet float32 export
max |Δlogit| 0.0 (an int8 activation code can still flip at an exact .5 tie in HF's compiled quantizer: ~2e-3);
bfloat16 export 8.9e-3 (1.8e-3 of max |logit|: bf16 keeps 8 mantissa bits, 2^-9 relative rounding of the
embeddings, norms and lm_head); top-1 agreement 1.0 in every case. GGUF exports are compared with the source
model whose scales are rounded to fp16 as the TQ blocks store them (``ExportFormat.reference``): 0.0. A wrong or
damaged export moves logits by O(max |logit|) and agrees on ~1/vocab of the tokens, so
the bounds below keep ~5-10x headroom over rounding and still separate the two by orders of magnitude.
"""

from typing import Mapping, Optional

# storage precision of the unpacked tensors -> (min top-1 agreement, max |Δlogit| relative to max(1, max |logit|))
AGREEMENT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (0.999, 5e-3),
    "bfloat16": (0.99, 2e-2),
    "float16": (0.99, 1e-2),
}


def check_agreement(agreement: Mapping[str, float], precision: str, reference_max_abs_logit: float) -> Optional[str]:
    """None if ``agreement`` (from :func:`qat.eval.perplexity.logits_agreement`) is within the tolerance of an
    export stored at ``precision``; else the reason, as an error message."""
    min_top1, rel = AGREEMENT_TOLERANCES[precision]
    max_diff = rel * max(1.0, reference_max_abs_logit)
    top1, diff = agreement["top1_agreement"], agreement["max_abs_logit_diff"]
    if top1 >= min_top1 and diff <= max_diff:
        return None
    return (f"the export does not compute its source checkpoint's model: top-1 agreement {top1:.4f} (needs >= "
            f"{min_top1}), max |Δlogit| {diff:.3g} (allowed {max_diff:.3g} for {precision} storage). The export is "
            "damaged or was written by a broken exporter; re-export it with `qat export --force`")
