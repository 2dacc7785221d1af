"""The error type of the template stage."""

from apsnake.errors import ApsnakeError


class TemplateError(ApsnakeError, ValueError):
    """Inputs that cannot make a template (no overlap, mixed bands, mismatched grids...)."""
