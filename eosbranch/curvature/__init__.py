"""Curvature: Hessian-vector products, group curvature and matrix-free top eigenpairs."""

from .lanczos import *  # noqa: F401,F403
from .lanczos import __all__, _running_stats_frozen, _spare_basis  # noqa: F401
