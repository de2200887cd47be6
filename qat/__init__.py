"""qat: quantization-aware training of low-bit language models.

Layers, imports pointing down: ``qat.quant`` (numerics) <- ``qat.nn`` (layers, model surgery) <-
``qat.data``/``qat.train``/``qat.export``/``qat.eval``/``qat.cluster``/``qat.cli`` (orchestration).
"""

__version__ = "0.1.0"
