"""streamquant: layer-streaming DartQuant quantization.

`streamquant.load(path)` loads an export into transformers with its online transforms attached (see
`streamquant.loader`); it is imported lazily, so `import streamquant` stays light and needs no compressed-tensors.
"""

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from streamquant.loader import load

        return load
    raise AttributeError(f"module 'streamquant' has no attribute {name!r}")
