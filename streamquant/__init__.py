"""streamquant: layer-streaming DartQuant quantization.

`streamquant.load(path)` loads an export into transformers with its online transforms attached (see
`streamquant.loader`); it is imported lazily, so `import streamquant` stays light and needs no compressed-tensors.
"""

import sys
from pathlib import Path

# A checkout's top-level kernels/ (installed as streamquant.kernels) shadows Hugging Face's `kernels` package, which
# transformers >= 5.25 imports, whenever the checkout root is on sys.path: `python -m ...` or `python -c ...` started
# there puts it first ("cannot import name 'CUDAProperties' from 'kernels'"). Nothing is imported from that root
# (streamquant resolves through its install), so it is dropped.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "kernels" / "__init__.py").is_file() and (_checkout / "pyproject.toml").is_file():
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _checkout]

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from streamquant.loader import load

        return load
    raise AttributeError(f"module 'streamquant' has no attribute {name!r}")
