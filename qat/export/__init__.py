"""Export formats (one module each, listed in :mod:`qat.export.formats`), the shared folder I/O
(:mod:`qat.export.folder`) and the public entry point :func:`export_model`."""

from qat.export.api import export_model
from qat.export.formats import EXPORT_FORMATS, get_format

__all__ = ["export_model", "EXPORT_FORMATS", "get_format"]
