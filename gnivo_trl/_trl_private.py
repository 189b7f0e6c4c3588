"""The one place that imports TRL names outside TRL's public API (underscore names, and names that no `__all__` of a
TRL package exports), with the TRL releases that have them.

A name is imported when first used, so a rename in a TRL release breaks only the feature that uses it, with an error
that says which TRL to install, instead of `import gnivo_trl`. `tests/test_trl_private.py` lists every such name the
package uses: a TRL upgrade checks those.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["SUPPORTED_TRL", "profiled", "trl_private"]

# The TRL releases whose non-public names this package uses (pyproject.toml pins the same range).
SUPPORTED_TRL = ">=1.16.0,<1.17"


def trl_private(module: str, name: str) -> Any:
    """`module.name` from TRL, imported now, with an error naming the TRL versions that have it.

    Args:
        module: the TRL module, e.g. `"trl.kernels.chunked_divergence"`.
        name: the attribute of that module.

    Raises:
        ImportError: the installed TRL has no such module or name; the message names `SUPPORTED_TRL`.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        import trl

        raise ImportError(
            f"gnivo-trl uses {module}.{name}, which TRL {trl.__version__} does not provide. gnivo-trl is tested with "
            f"trl{SUPPORTED_TRL}: pip install 'trl{SUPPORTED_TRL}'."
        ) from error


def profiled(method: Callable) -> Callable:
    """A trainer method decorated with TRL's `profiling_decorator`, which is looked up on the method's first call
    (not when the class is defined), so that `import gnivo_trl` needs no non-public TRL name.

    Each call is then timed exactly as TRL times its own trainer methods (`profiling/Time taken: <class>.<method>`,
    reported to the trainer's `report_to` backends).
    """
    decorated: Callable | None = None

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        nonlocal decorated
        if decorated is None:
            decorated = trl_private("trl.extras.profiling", "profiling_decorator")(method)
        return decorated(*args, **kwargs)

    return wrapper
