"""The table of export formats: ``--format`` name -> :class:`qat.export.exporter.ExportFormat`.

A new format is one module in ``qat/export/`` that builds an ``ExportFormat`` (check / write / load / runtime)
plus one entry here.
"""

from typing import Optional

from torch import nn

from qat.errors import ExportError
from qat.export import binary, gguf, gguf_q4_0, hf_bitnet, hf_fp, qat_packed
from qat.export.exporter import ExportFormat, model_scheme

EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (hf_bitnet.FORMAT, hf_fp.FORMAT, gguf.TQ2_0,
                                                                gguf.TQ1_0, gguf_q4_0.FORMAT, binary.FORMAT,
                                                                qat_packed.FORMAT)}
FULL_PRECISION_FORMAT = "hf-fp"


def get_format(name: str) -> ExportFormat:
    """The format ``--format name`` selects.

    Raises:
        ExportError: unknown name (the message lists the known ones).
    """
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown export format {name!r}; use one of {', '.join(EXPORT_FORMATS)}") from None


def default_format_name(scheme_name: Optional[str]) -> str:
    """The format a scheme exports to by default (``hf-fp`` for a full-precision model)."""
    if scheme_name is None:
        return FULL_PRECISION_FORMAT
    from qat.nn.schemes import get_scheme

    return get_scheme(scheme_name).default_export


def default_format(model: nn.Module) -> ExportFormat:
    scheme = model_scheme(model)
    return get_format(default_format_name(scheme.name if scheme else None))
