"""The one place that imports TRL names outside TRL's public API (underscore names, and names a module does not
export in `__all__`), with the TRL releases that have them.

A name is imported when first used, so a rename in a TRL release breaks only the feature that uses it, with an error
that says which TRL to install, instead of `import gnivo_trl`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SUPPORTED_TRL", "trl_private"]

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
