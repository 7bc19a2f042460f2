"""mbnet: MobileNetV1 from scratch, C++ kernels under a small NumPy autograd."""
from ._native import _C  # noqa: F401  (checks the build matches this CPU)
from . import functional, models, nn, plan  # noqa: F401
from .tensor import Function, Tensor, is_grad_enabled, no_grad  # noqa: F401

__version__ = "0.1.0"
