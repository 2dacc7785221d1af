"""Options of PSF star selection and of the PSF model fit, and the PSF error type."""

from __future__ import annotations

from dataclasses import dataclass

from apsnake.errors import ApsnakeError


class PsfError(ApsnakeError, ValueError):
    """The PSF cannot be measured (too few good stars, bad input)."""


@dataclass
class PsfConfig:
    """PSF star selection and model options (Rubin defaults where Rubin has one).

    Attributes
    ----------
    stamp_size : int
        Side of the PSF stamp, pixels, odd. Rubin PSFEx ``kernelSize=41`` at 0.168"/px (HSC);
        25 px (6.6") covers DECam seeing of 0.8-2".
    spatial_order : int
        Order of the 2-D polynomial in position (Rubin PSFEx ``spatialOrder=2``). Lowered
        automatically when there are fewer than ``min_stars_per_term * n_terms`` usable
        stars: with ~70 stars an order-2 fit (6 terms) chases noise at the CCD corners
        (FWHM off by 3% on the simulator's truth) where order 1 is within 1%.
    min_stars_per_term : float
        Usable PSF stars needed per polynomial term to keep an order.
    min_snr : float
        Minimum S/N of a PSF star (Rubin objectSize ``signalToNoiseMin=50``).
    max_stars : int
        At most this many stars (the highest-S/N ones) are selected.
    min_stars : int
        ``PsfError`` when fewer usable stars remain.
    isolation_radius : float
        Pixels. A star is isolated when no other detection within this radius is brighter
        than ``isolation_flux_ratio`` times its flux.
    isolation_flux_ratio : float
        See ``isolation_radius``.
    width_std_allowed : float
        Fractional half-width of the stellar size locus around its mode (Rubin objectSize
        ``widthStdAllowed=0.15``).
    clip_sigma : float
        Sigma-clipping threshold for the size locus and the star chi2 rejection.
    n_iter : int
        Clipping iterations of the size locus; fit/reject iterations of the model.
    accuracy : float
        Fractional model uncertainty added in quadrature to the pixel noise when weighting
        and rejecting stars (PSFEx ``PSF_ACCURACY=0.01``): bright stars do not dominate.
    pixel_clip : float
        Pixels deviating by more than this many sigma from the model are ignored (cosmic
        rays, faint neighbours).
    """

    stamp_size: int = 25
    spatial_order: int = 2
    min_stars_per_term: float = 20.0
    min_snr: float = 50.0
    max_stars: int = 300
    min_stars: int = 10
    isolation_radius: float = 12.0
    isolation_flux_ratio: float = 0.1
    width_std_allowed: float = 0.15
    clip_sigma: float = 3.0
    n_iter: int = 3
    accuracy: float = 0.01
    pixel_clip: float = 5.0

    def __post_init__(self):
        if self.stamp_size < 7 or self.stamp_size % 2 != 1:
            raise PsfError(f"stamp_size must be odd and >= 7, got {self.stamp_size}")
        if self.spatial_order < 0:
            raise PsfError(f"spatial_order must be >= 0, got {self.spatial_order}")
        if self.min_stars < 1 or self.max_stars < self.min_stars:
            raise PsfError(f"need 1 <= min_stars <= max_stars, got {self.min_stars}, {self.max_stars}")
