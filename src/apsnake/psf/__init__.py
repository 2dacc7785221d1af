"""PSF stars, the spatially varying pixel-basis PSF model, and PSF photometry.

Modules
-------
``config``      ``PsfConfig`` (selection and fit options), ``PsfError``
``select``      ``select_psf_stars``: clean, isolated, bright stars on the stellar size locus
``fit``         ``fit_psf`` / ``fit_psf_model``: the PSFEx-like pixel-basis model (``PsfModel``)
``photometry``  ``psf_flux``: linear PSF fits at fixed positions (Rubin PsfFlux)
``measure``     ``measure_fwhm``, ``windowed_moments``, ``psf_widths``, ``psf_sigma``
``shift``       sub-pixel shifts of stamps (sinc) and of their masks (|Lanczos-3|)

Conventions: 0-based pixel coordinates (x column, y row) of the trimmed image; images
background-subtracted in any linear unit, variances in that unit squared; fluxes in the image
unit. The model itself is ``apsnake.exposure.PsfModel``. docs/algorithms.md describes the method.
"""

from apsnake.psf.config import PsfConfig, PsfError
from apsnake.psf.fit import PsfFit, fit_psf, fit_psf_model
from apsnake.psf.measure import measure_fwhm, psf_sigma, psf_widths, windowed_moments
from apsnake.psf.photometry import psf_flux
from apsnake.psf.select import select_psf_stars

__all__ = [
    "PsfConfig", "PsfError", "PsfFit", "fit_psf", "fit_psf_model", "measure_fwhm", "psf_flux", "psf_sigma",
    "psf_widths", "select_psf_stars", "windowed_moments",
]
