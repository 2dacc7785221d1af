"""Image differencing: Alard-Lupton PSF matching with decorrelation, and ZOGY.

Modules
-------
``subtract``      ``subtract``: the entry point (science minus PSF-matched template), ``skipped_difference``
``config``        ``DiffimConfig``, ``DiffimResult``, ``DiffimError``, ``DiffimSkip``
``noise``         usable pixels and variance-plane rescaling (Rubin ``scaleVariance``)
``masks``         the difference mask from the science and template masks
``kernel_stars``  the stars the matching kernel is fitted to (variables and movers rejected)
``extent``        how far the PSF halos reach: the encircled energy of both images' bright stars
``basis``         the Alard-Lupton basis and its widths
``kernel_fit``    the spatially varying kernel fit with star rejection
``halo``          wide kernel terms that match the PSF halos, fitted to bright stars' ring profiles
``convolve``      whole-image convolution with the spatial kernel; decorrelation (DMTN-021)
``alard_lupton``  the Alard-Lupton method (Rubin ``AlardLuptonSubtractTask`` defaults)
``zogy``          the ZOGY method (Zackay, Ofek & Gal-Yam 2016)

docs/algorithms.md (difference imaging) describes the methods and our choices.
"""

from apsnake.diffim.basis import alard_lupton_basis, basis_sigmas
from apsnake.diffim.config import DiffimConfig, DiffimError, DiffimResult, DiffimSkip
from apsnake.diffim.subtract import skipped_difference, subtract

__all__ = [
    "DiffimConfig", "DiffimError", "DiffimResult", "DiffimSkip", "alard_lupton_basis", "basis_sigmas",
    "skipped_difference", "subtract",
]
