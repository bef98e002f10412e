"""eosbranch: causal studies of the edge of stability.

Train a network, save its exact state, fork it into branches that differ in one controlled way,
and compare per group of examples how learning differs.
"""

__version__ = "0.1.0"

# The API functions share their names with their modules (DESIGN §3); importing them here binds
# the package attribute to the function.
from .errors import EosbranchError, SpecError  # noqa: E402
from .run import Run, load  # noqa: E402
from .spec import Spec, load_spec  # noqa: E402
from .train import resume, train  # noqa: E402
from .fork import fork  # noqa: E402
from .compare import compare, summarize  # noqa: E402
from .sweep import sweep  # noqa: E402
from .report import report  # noqa: E402

__all__ = ["EosbranchError", "Run", "Spec", "SpecError", "compare", "fork", "load", "load_spec", "report", "resume", "summarize", "sweep", "train"]
