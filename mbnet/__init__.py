"""mbnet: MobileNetV1 from scratch, C++ kernels under a small NumPy autograd."""
from ._native import _C  # noqa: F401  (checks the build matches this CPU)

__version__ = "0.1.0"
