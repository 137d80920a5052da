"""impflow: Implicit Normalizing Flows for PyTorch, with fused C++/CUDA kernels.

References:
    Lu, Chen, Li, Wang, Zhu. Implicit Normalizing Flows. ICLR 2021.
"""

from impflow._extension import has_cuda_kernels
from impflow import logdet, nn, ops, solvers
from impflow.flow import Flow, bits_per_dim

__version__ = "0.1.0"
__all__ = [
    "Flow",
    "bits_per_dim",
    "has_cuda_kernels",
    "logdet",
    "nn",
    "ops",
    "solvers",
    "__version__",
]
