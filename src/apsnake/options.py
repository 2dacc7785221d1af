"""Stage options from the workflow configuration: one config section -> one dataclass."""

from __future__ import annotations

from dataclasses import fields


def dataclass_from_options(cls, options: dict | None, section: str, error=ValueError):
    """``cls(**options)`` for a config section whose keys are ``cls`` field names.

    Missing keys keep their defaults and YAML lists become tuples; an unknown key raises
    ``error`` naming the section, the key and the known ones.
    """
    options = dict(options or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise error(f"unknown {section} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
