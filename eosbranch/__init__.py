"""eosbranch: causal studies of the edge of stability.

Train a network, save its exact state, fork it into branches that differ in one controlled way,
and compare per group of examples how learning differs.
"""

from .version import __version__  # noqa: F401

# The API functions share their names with their modules: `eosbranch.compare` is the module
# `eosbranch/compare.py` *and* callable as the function (`eosbranch.compare(run)`,
# `eosbranch.compare.curves(run)`, `import eosbranch.compare as c` all work); the same for train,
# fork, sweep and report (see `_api_modules` below).
import sys as _sys
import types as _types

from .errors import EosbranchError, SpecError  # noqa: E402
from .run import Run, load  # noqa: E402
from .spec import Spec, load_spec  # noqa: E402
from .train import resume, train  # noqa: E402
from .fork import fork  # noqa: E402
from .compare import compare, summarize  # noqa: E402
from .sweep import sweep  # noqa: E402
from .report import report  # noqa: E402


class _CallableModule(_types.ModuleType):
    """A module that is also its own main function (``eosbranch.compare(run)`` calls
    ``eosbranch.compare.compare(run)``), so the module's other names stay reachable."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _api_modules(*names: str) -> None:
    for name in names:
        module = _sys.modules[f"{__name__}.{name}"]
        module.__class__ = _CallableModule
        globals()[name] = module  # the package attribute is the module, not the function


_api_modules("train", "fork", "compare", "sweep", "report")

__all__ = ["EosbranchError", "Run", "Spec", "SpecError", "compare", "fork", "load", "load_spec", "report", "resume", "summarize", "sweep", "train"]
