"""streamquant: layer-streaming DartQuant quantization."""

__version__ = "0.1.0"
