"""Options of DIA source detection and measurement, and the stage's error type."""

from __future__ import annotations

import math
from dataclasses import dataclass

from apsnake.errors import ApsnakeError


class DiaError(ApsnakeError, ValueError):
    """Inputs that do not allow DIA source detection (missing PSF or WCS, shape mismatch...)."""


@dataclass
class DiaConfig:
    """Options of ``detect_dia_sources`` (Rubin default in brackets where Rubin has one).

    Attributes
    ----------
    threshold : float
        Detection threshold in sigma of the PSF-filtered difference image, applied to both
        signs [5].
    grow_footprint : int
        Footprints are grown by this many pixels before positive and negative ones are
        merged [2].
    deblend : bool
        Split a merged footprint with several significant peaks of one sign into one source
        per peak (Rubin ``doDeblend``, off by default there). Peaks are local maxima of the
        sign-flipped matched-filtered image at or above ``threshold``; a peak other than the
        lobe's highest is kept when it is at least ``deblend_min_separation`` FWHM from every
        higher kept peak and rises ``deblend_min_prominence`` noise sigmas above the saddle
        that joins it to higher ground. A positive and a negative peak closer than
        ``dipole_max_separation`` + 1 PSF sigmas stay one source (a dipole candidate). Children
        are DiaSources of their own; the parent is not written (``parentDiaSourceId`` null).
    deblend_min_separation : float
        Smallest distance between two peaks of one sign that are kept apart, in units of the
        difference PSF's FWHM.
    deblend_skip_planes : tuple of str
        A footprint touching pixels of these mask planes is not deblended (as meas_deblender's
        ``maskLimits``): the residual around a saturated star is one artefact, and its
        fragments, each clear of the saturated pixels that drop the whole, are not sources.
    deblend_min_prominence : float
        Smallest drop of the matched-filtered image from a secondary peak to the highest
        saddle towards a higher peak, in units of the matched filter's noise at the peak.
    min_area : int
        Smallest raw footprint kept, pixels [minPixels=1].
    aperture_radius : float
        Radius of the aperture flux, pixels [12].
    detection_bad_planes : tuple of str
        Mask planes treated as no signal in detection [NO_DATA pixels are set to 0].
    measure_bad_planes : tuple of str
        Mask planes left out of the PSF, aperture and dipole fits.
    dipole_max_separation : float
        Largest lobe distance from its detection peak in the fit, and largest lobe
        separation of a dipole, in units of the PSF Gaussian sigma [maxSeparation=5].
    dipole_rel_weight : float
        Weight of the science and template pixels relative to the difference pixels in
        the dipole fit; 0 fits the difference image alone [relWeight=0.5].
    dipole_separate_fluxes : bool
        Fit the two lobes with independent amplitudes (Rubin's default is equal amplitudes,
        fitSeparateNegParams=False, with which the flux-ratio test never fails; we fit them
        separately so that it means something).
    dipole_min_sn : float
        Minimum quadrature S/N of the two lobes for ``isDipole`` [minSn=5 sqrt(2)].
    dipole_max_flux_ratio : float
        Maximum fraction of the total absolute flux in either lobe for ``isDipole``
        [maxFluxRatio=0.65].
    dipole_max_footprint_area : int
        Footprints larger than this (pixels) are not fitted as dipoles.
    moments_half_size : int
        Half side of the stamp for the adaptive moments, pixels.
    drop_flagged : bool
        Apply Rubin detectAndMeasure's drop rules (``drop_offimage``, ``drop_center_any``,
        ``drop_center_all``).
    drop_offimage : bool
        Drop sources whose centroid is off the image.
    drop_center_any : tuple of str
        Drop sources with any of these planes in the 3x3 centre pixels.
    drop_center_all : tuple of str
        Drop sources with all 3x3 centre pixels in one of these planes.
    template_flux_error : float
        Fraction of the template's PSF flux at the source (``templateFlux``) added in
        quadrature to ``psfFluxErr`` (not in Rubin): PSF matching leaves about 1% of a star's
        template flux in the difference, coherently over the PSF, which the per-pixel
        ``diffim.model_error`` variance term covers only at about a fifth of that; without
        it the flux pulls of variable stars brighter than g ~ 18 have a scatter of ~1.8.
        0 disables.
    apply_filter : bool
        Apply Rubin filterDiaSourceCatalog's rules (``filter_*``).
    filter_centroid_flag : bool
        Drop sources whose centroid failed.
    filter_center_any : tuple of str
        Drop sources with these planes in the centre [crCenter].
    filter_center_all : tuple of str
        Drop sources with all centre pixels in these planes [high_varianceCenterAll].
    filter_min_science_snr : float or None
        Drop sources with scienceFlux / scienceFluxErr below this [minAllowedDirectSnr=-2];
        None disables.
    debias_centroid_flux : bool
        Correct ``psfFlux`` for measuring at the source's own centroid (not in Rubin): the PSF
        flux at the position that maximises it exceeds the flux at the true position by
        ``sigma_F^2 / F`` on average (two fitted coordinates; ``sigma_F`` the PSF flux's pixel
        noise), a pull bias of ``1 / (S/N)``: +0.1 at S/N 10. ``psfFlux`` becomes
        ``F (1 - min(sigma_F^2 / F^2, 1/4))``; its error, and the fluxes forced at the position
        (``scienceFlux``, ``templateFlux``, DiaForcedSource) are unchanged. Not applied to
        dipoles, whose position is the midpoint of two fitted lobes.
    filter_max_peak_excess : float or None
        Drop sources (not dipoles) whose centre pixel is brighter than their PSF flux predicts
        by more than this many sigma (``measure.peak_excess_sigma``): sharper than the PSF, a
        cosmic ray that the calibration did not mask (not in Rubin, whose real/bogus
        classifier does this). None disables.
    filter_matching_snr : bool
        Drop sources (not dipoles) whose detection S/N, scaled by the ratio of the PSF-flux
        error without and with the ``template_flux_error`` term, is below ``threshold``: a
        difference that PSF-matching error of the template flux explains (the cores of bright
        stars; not in Rubin). Needs ``template_flux_error`` > 0 and a matched template.
    """

    threshold: float = 5.0
    grow_footprint: int = 2
    deblend: bool = True
    deblend_min_separation: float = 1.0
    deblend_min_prominence: float = 4.0
    deblend_skip_planes: tuple = ("SAT", "SAT_TEMPLATE")
    min_area: int = 1
    aperture_radius: float = 12.0
    detection_bad_planes: tuple = ("BAD", "NO_DATA")
    measure_bad_planes: tuple = ("BAD", "NO_DATA")
    dipole_max_separation: float = 5.0
    dipole_rel_weight: float = 0.5
    dipole_separate_fluxes: bool = True
    dipole_min_sn: float = 5.0 * math.sqrt(2.0)
    dipole_max_flux_ratio: float = 0.65
    dipole_max_footprint_area: int = 10_000
    moments_half_size: int = 12
    drop_flagged: bool = True
    drop_offimage: bool = True
    drop_center_any: tuple = ("BAD", "EDGE", "NO_DATA", "SAT", "SAT_TEMPLATE", "SPIKE")
    drop_center_all: tuple = ("INTRP",)
    template_flux_error: float = 0.01
    debias_centroid_flux: bool = True
    apply_filter: bool = True
    filter_centroid_flag: bool = True
    filter_center_any: tuple = ("CR",)
    filter_center_all: tuple = ("HIGH_VARIANCE",)
    filter_min_science_snr: float | None = -2.0
    filter_max_peak_excess: float | None = 4.0
    filter_matching_snr: bool = True

    def __post_init__(self):
        if not self.threshold > 0:
            raise DiaError(f"threshold must be > 0, got {self.threshold}")
        if self.grow_footprint < 0 or self.min_area < 1:
            raise DiaError(f"need grow_footprint >= 0 and min_area >= 1, got {self.grow_footprint}, {self.min_area}")
        if not 0 <= self.template_flux_error < 1:
            raise DiaError(f"template_flux_error must be in [0, 1), got {self.template_flux_error}")
        if not self.deblend_min_separation >= 0 or not self.deblend_min_prominence >= 0:
            raise DiaError(f"deblend_min_separation and deblend_min_prominence must be >= 0, got "
                           f"{self.deblend_min_separation}, {self.deblend_min_prominence}")
        if not self.aperture_radius > 0:
            raise DiaError(f"aperture_radius must be > 0, got {self.aperture_radius}")
