"""bitq-tvm: block-floating-point DNN inference on embedded CPUs, planned and compiled with TVM."""

from .errors import BitqError  # noqa: F401
from .support.version import VERSION as __version__  # noqa: F401
from .pipeline import pipeline  # noqa: F401 - cheap: the module defers its TVM imports to the call
