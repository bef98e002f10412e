"""Hard bounds on the sizes a spec may ask for (issue 17), used by the registries' parameter models.

``MAX_WIDTH``, ``MAX_DEPTH``, ..., ``MAX_LR``: far above any study here, they turn
``width: 1000000000`` or ``lr: 1e308`` into a one-line spec error; they cannot be switched off (nor
can ``steps <= 1e8``). The memory estimate checked before a run starts, which ``--no-limits``
skips, is in resources.py (it builds the model, so it sits above the models these bounds serve).
"""

from __future__ import annotations

MAX_WIDTH = 1_000_000  # mlp width, conv channels / widths
MAX_DEPTH = 10_000  # mlp hidden layers, resnet blocks per stage
MAX_DIM = 10_000_000  # input dimensions of generated data (prototypes dim, linear_opposing d1/d2)
MAX_POINTS = 100_000_000  # points of generated data (n, n_per_class)
MAX_DEGREE = 10_000  # chebyshev degree (a loop of that many steps)
MAX_LR = 1e6  # step sizes: finite in float32 with room for the threshold 2/lr and products
