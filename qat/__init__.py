"""qat: quantization-aware training of low-bit language models.

Layers, imports pointing down: ``qat.quant`` (numerics) <- ``qat.nn`` (layers, schemes, model surgery) <-
``qat.data``/``qat.train``/``qat.checkpoint``/``qat.export``/``qat.eval``/``qat.cluster``/``qat.cli``
(orchestration).

Use qat as a library::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qat import QuantConfig, quantize, pack_model, export_model

    model = AutoModelForCausalLM.from_pretrained("path/to/local/model")
    quantize(model, QuantConfig(weight="absmean_ternary"))   # linear layers -> BitLinear (STE), trainable as is
    ...                                                       # your training loop, or `qat fit` on a recipe
    export_model(model, AutoTokenizer.from_pretrained("path/to/local/model"), "out/my-model-ternary")
    fast = pack_model(model)                                  # packed 2-bit kernels for inference

The names below are imported lazily, so ``import qat`` stays cheap.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it. Stable: configs, model surgery, packing, export. Extension points: schemes.
_PUBLIC = {
    # stable
    "QuantConfig": "qat.nn.config",
    "ArchConfig": "qat.nn.config",
    "quantize": "qat.nn.convert",
    "build_model": "qat.nn.convert",
    "pack_model": "qat.nn.packed_linear",
    "export_model": "qat.export",
    "load_trained_model": "qat.checkpoint.trained",
    # extension points: add a quantization scheme
    "Scheme": "qat.nn.schemes",
    "SCHEMES": "qat.nn.schemes",
    "get_scheme": "qat.nn.schemes",
    "register_scheme": "qat.nn.schemes",
    "QuantizedLinear": "qat.nn.quantized",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
