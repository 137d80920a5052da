"""impflow's custom ops (fused kernels) and their pure-PyTorch references."""

from impflow.ops.broyden import broyden_step
from impflow.ops.mlp_vjp_series import mlp_vjp_series
from impflow.ops.power import power_iteration
from impflow.ops.track import solver_track
from impflow.ops import reference

__all__ = ["broyden_step", "mlp_vjp_series", "power_iteration", "solver_track", "reference"]
