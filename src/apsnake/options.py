"""Stage options from the workflow configuration: one config section -> one dataclass.

Every stage's options are a dataclass whose field names are the keys of its section of
``config.yaml`` (``isr``, ``calibrate``, ``templates.coadd``, ``diffim``, ``dia``,
``association``); ``dataclass_from_options`` is the one way a section becomes options.
A field whose default is itself a dataclass is a nested section (``calibrate.psf``).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass

from apsnake.errors import ApsnakeError


class OptionsError(ApsnakeError, ValueError):
    """A configuration section with an unknown key."""


def _tuples(value):
    """YAML lists (at any depth) as tuples, so options are hashable and immutable."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def dataclass_from_options(cls, options: dict | None, section: str, error=OptionsError):
    """``cls(**options)`` for a config section whose keys are ``cls`` field names.

    Missing keys keep their defaults; lists become tuples; a mapping given for a field whose
    default is a dataclass builds that dataclass the same way (``section.key``). An unknown
    key raises ``error`` naming the section, the key and the known ones.
    """
    options = dict(options or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise error(f"unknown {section} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    defaults = cls()
    values = {}
    for key, value in options.items():
        default = getattr(defaults, key)
        if is_dataclass(default) and isinstance(value, dict):
            values[key] = dataclass_from_options(type(default), value, f"{section}.{key}", error)
        else:
            values[key] = _tuples(value)
    return cls(**values)
