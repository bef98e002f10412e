"""Curvature: the objective, Hessian-vector products and group curvature behind one backend
interface, and matrix-free top eigenpairs.

- ``objective``: the model, loss, points, weights and chunks every backend differentiates;
- ``backend``: ``select_backend`` (every eligibility check) and the backends ``autograd`` (any
  model), ``input_linear`` (a first ``nn.Linear``) and ``mlp`` (MLP chains: ``mlp``'s R-operator
  HVPs and ``taylor``'s group curvature);
- ``operator``: ``hessian_matvec`` (x -> H x) and ``preconditioned_matvec``;
- ``lanczos``: ``top_eigenpairs``, started by ``warm_start`` (the gradient hint, ``WARM_HINT_RESIDUAL``; the
  trainer's choice between measurements: ``stale_warm_start``, ``extrapolated_start``);
  ``flat``: ``flatten``/``unflatten``/``project_out``; ``records``: what the products leave for the
  rest of a measurement (tangents along v1, recombined).
"""

from .autograd import DEFAULT_HVP_METHOD
from .backend import BACKENDS, select_backend
from .flat import flatten, unflatten
from .lanczos import EigenResult, release_workspace, top_eigenpairs
from .objective import GroupBatch, Objective, running_stats_frozen
from .operator import HVP_METHODS, HessianOperator, hessian_matvec, preconditioned_matvec
from .warm_start import LOSS_JUMP, PATH_STEP, WARM_HINT_RESIDUAL, extrapolated_start, path_ratio, stale_warm_start

# The name step_losses, mechanism and input_linear imported before the package existed.
_running_stats_frozen = running_stats_frozen

__all__ = [
    "EigenResult", "top_eigenpairs", "hessian_matvec", "HessianOperator", "preconditioned_matvec",
    "flatten", "unflatten", "release_workspace", "DEFAULT_HVP_METHOD", "HVP_METHODS",
    "Objective", "GroupBatch", "select_backend", "BACKENDS", "running_stats_frozen", "WARM_HINT_RESIDUAL", "LOSS_JUMP",
    "stale_warm_start", "extrapolated_start", "path_ratio", "PATH_STEP",
]
