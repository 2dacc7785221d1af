"""Package namespaces that import a submodule only when one of its names is first used.

A workflow job is a fresh interpreter: every module it imports costs it start-up time, so a
package ``__init__`` re-exports its public names lazily (PEP 562) instead of importing every
submodule, and with them pandas, scipy or fastavro, for a job that needs one function.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``package.<module>`` on first
    access of a name that ``exports`` maps to ``<module>``, and keeps the value.

    ``from package import name`` and ``package.name`` behave as with an eager import; an
    unknown name raises ``AttributeError`` as usual.
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
