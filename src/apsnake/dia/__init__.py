"""DIA sources: detection and measurement on a difference image (Rubin detectAndMeasure).

Modules
-------
``detect_and_measure``  ``detect_dia_sources``: the entry point, a DiaSource table per image
``config``              ``DiaConfig``, ``DiaError``
``detect``              footprints of both signs, peaks, deblending, sub-pixel centroids
``dipole``              dipole fits of two-signed footprints
``measure``             PSF and aperture fluxes, pixel flags, adaptive moments, local WCS Jacobian

docs/algorithms.md (DIA sources) describes the method and our choices.
"""

from apsnake.dia.config import DiaConfig, DiaError
from apsnake.dia.detect_and_measure import detect_dia_sources

__all__ = ["DiaConfig", "DiaError", "detect_dia_sources"]
