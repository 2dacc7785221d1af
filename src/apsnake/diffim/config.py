"""Options, result and error types of image subtraction."""

from __future__ import annotations

from dataclasses import dataclass

from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure


class DiffimSkip(ApsnakeError, ValueError):
    """Documented outcome "skip this data ID": too little template coverage or too few kernel
    stars. The message gives the numbers."""


class DiffimError(ApsnakeError, ValueError):
    """Unusable input to the subtraction (shapes differ, a PSF is missing, bad configuration)."""


@dataclass
class DiffimConfig:
    """Image subtraction options (Rubin ``AlardLuptonSubtractTask`` defaults where it has them).

    Attributes
    ----------
    method : str
        ``"alard-lupton"`` or ``"zogy"``.
    convolve : str
        ``"template"``, ``"science"`` or ``"auto"`` (convolve the science image only when the
        template PSF is wider in both axes, Rubin ``mode="auto"``). Alard-Lupton only.
    n_gaussians, degrees, sigmas :
        Number, polynomial degrees and base widths (pixels) of the Gaussians of the basis.
    scale_by_fwhm : bool
        Scale the widths with the seeing difference (Rubin ``scaleByFwhm``).
    min_sigma, min_sigma_deconvolve : float
        Smallest kernel width, pixels (Rubin ``alardMinSig`` 0.7 and ``alardMinSigDeconv`` 0.4).
    gauss_beta : float
        Ratio of successive widths (Rubin ``alardGaussBeta``).
    kernel_size_fwhm_scaling, kernel_size_min, kernel_size_max :
        Kernel side = odd ``int(scaling * sigma_last)`` clamped to [min, max] pixels.
    spatial_order : int
        Polynomial order of the kernel's spatial variation (Rubin ``spatialKernelOrder=1``).
    background_order : int
        Polynomial order of the fitted differential background (Rubin ``spatialBgOrder=2``;
        fitted, not subtracted).
    min_stars_per_term : float
        The orders are lowered while there are fewer kernel stars than this per polynomial term.
    star_box_size, stars_per_box : int
        Kernel stars are spread over square boxes of ``star_box_size`` pixels, at most
        ``stars_per_box`` (the highest-S/N ones) per box (Rubin ``sizeCellX/Y=128``,
        ``nStarPerCell=5``).
    min_kernel_stars, max_kernel_stars : int
        ``DiffimSkip`` with fewer usable kernel stars; at most this many are used.
    kernel_star_snr : tuple of float
        Range of S/N of kernel stars (Rubin 10-500); an upper limit of None keeps the brightest
        (unsaturated: SAT pixels exclude a star), which constrain the PSF wings best.
    ratio_clip_sigma, ratio_floor : float
        Candidates whose science/template PSF-flux ratio deviates from the candidates' median by
        more than ``ratio_clip_sigma`` (in units of its noise and ``ratio_floor`` of the ratio,
        scaled by the deviations' robust scatter) are rejected: a variable star or a transient
        must not define the kernel.
    residual_sigma, residual_flux_floor, residual_shift_floor : float
        A kernel star is also rejected when its residual after the fit is, as a flux, more than
        ``residual_sigma`` times its noise and more than ``residual_flux_floor`` of the star's
        flux, or, as a shift of the star, more than ``residual_sigma`` times its noise and
        more than ``residual_shift_floor`` pixels: a star that varied or moved (proper
        motion) must not define the kernel.
    mask_kernel_fraction : float
        Mask planes of the convolved image grow, and the image border becomes EDGE, by the
        half-width of the square that holds this fraction of the kernel's absolute weight (the
        whole kernel for 1).
    rejection_accuracy : float
        Fraction of the model added in quadrature to the pixel noise of the residuals that
        reject kernel stars (as PSFEx's PSF_ACCURACY): the brightest stars, which constrain the
        wings best, are not rejected for a per-cent mismatch of their cores. (In the fit's
        weights it would loosen the match of bright cores and was measured to add false
        detections near g 16-20 stars, so the weights keep the pixel noise only.)
    halo_encircled_energy : float or None
        The PSF halos are matched (``halo``) out to the radius inside which both images'
        bright stars hold this fraction of their flux (``extent``; at least
        ``halo_min_reach_fwhm`` FWHM, at most ``halo_radius_max``). None: the core kernel only
        (Rubin).
    halo_growth_radius : int
        Outer radius of the stars' measured growth curves, pixels (beyond it the fitted
        beta = 2 wing extrapolates).
    halo_radius_max : int
        Largest reach of the halo terms, pixels.
    halo_max_terms : int
        At most this many wide terms (widths doubling from twice the widest core Gaussian).
    halo_fit_min_snr : float
        The halo terms are fitted around sources at least this bright (S/N): a few-per-cent
        halo 40 px out is measurable only around bright stars (fainter ones add noise and pull
        the terms towards no halo; S/N 50 doubled the false detections near bright stars on the
        simulated nights, benchmarks/README.md).
    halo_fit_max_stars : int
        At most this many of them (the brightest).
    halo_rings : int
        Rings (logarithmically spaced from the core kernel's half-width to the reach) of the
        stars' profiles the terms are fitted to.
    halo_rounds : int
        Rounds of fitting the halo terms and refitting the core kernel to the target less
        their contribution (the two overlap a little between the core and the halo).
    halo_min_stars : int
        With fewer usable bright stars the measured radius is not used.
    halo_min_reach_fwhm : float
        The halo terms reach at least this many times the wider FWHM (where DECam halos still
        hold flux), whatever the measurement says.
    star_profile_min_snr : float or None
        Round residuals (rings) of the difference image around stars of at least this S/N, and
        around stars with saturated centres, are measured and the significant part taken out
        (``star_profiles``). None: not done.
    star_profile_radius, star_profile_radius_saturated : float
        Outer radius of those profiles, pixels, around unsaturated and saturated stars.
    star_profile_inner_fwhm : float
        Inner radius of the profiles, in FWHM of the wider PSF: the star's core (and a variable
        star's own difference) are left as they are.
    star_profile_max_stars : int
        At most this many stars (saturated ones first, then the brightest).
    star_profile_significance : float
        A profile knot is subtracted only when it is at least this many times its error.
    stamp_fwhm_scaling : float
        Fit stamp half-width = max(kernel half-width, ceil(this * FWHM of the target image)).
    n_iter : int
        Fit-and-reject iterations (Rubin ``maxSpatialIterations=3``).
    max_residual_mean, max_residual_std : float
        Reject kernel stars whose normalised residual mean / std exceed these (Rubin
        ``candidateResidualMeanMax=0.25``, ``candidateResidualStdMax=1.5``).
    max_condition : float
        Eigenvalues of the (Jacobi-scaled) normal matrix below ``max / max_condition`` are
        dropped from the solution (Rubin ``maxConditionNumber=5e7``).
    bad_mask_planes : tuple of str
        Mask planes that exclude a kernel star when present in its cutout of either image.
    min_template_coverage : float
        ``DiffimSkip`` when less than this fraction of the pixels has template coverage.
    scale_variance : bool
        Rescale both variance planes to the measured pixel noise first (Rubin
        ``doScaleVariance``); factors outside ``[1/limit, limit]`` are not applied.
    variance_scale_limit : float
        See ``scale_variance``.
    decorrelate : bool
        Apply the decorrelation afterburner (Alard-Lupton only).
    model_error : float
        Fraction of the matched template added in quadrature to the difference variance,
        a systematic floor for imperfect PSF matching at bright sources (0 = none, Rubin).
    isolation_flux_ratio : float
        A kernel star is rejected when a source within its stamp is brighter than this fraction
        of its flux, or any source lies within 2 FWHM.
    """

    method: str = "alard-lupton"
    convolve: str = "auto"
    n_gaussians: int = 3
    degrees: tuple = (4, 2, 2)
    sigmas: tuple = (0.7, 1.5, 3.0)
    scale_by_fwhm: bool = True
    min_sigma: float = 0.7
    min_sigma_deconvolve: float = 0.4
    gauss_beta: float = 2.0
    kernel_size_fwhm_scaling: float = 6.0
    kernel_size_min: int = 21
    kernel_size_max: int = 35
    spatial_order: int = 1
    background_order: int = 2
    min_stars_per_term: float = 3.0
    star_box_size: int = 128
    stars_per_box: int = 5
    min_kernel_stars: int = 3
    max_kernel_stars: int = 1000
    kernel_star_snr: tuple = (10.0, None)
    ratio_clip_sigma: float = 4.0
    ratio_floor: float = 0.01
    residual_sigma: float = 5.0
    residual_flux_floor: float = 0.02
    residual_shift_floor: float = 0.05
    mask_kernel_fraction: float = 0.99
    rejection_accuracy: float = 0.01
    halo_encircled_energy: float | None = 0.999
    halo_growth_radius: int = 40
    halo_radius_max: int = 40
    halo_max_terms: int = 4
    halo_fit_min_snr: float = 200.0
    halo_fit_max_stars: int = 300
    halo_rings: int = 12
    halo_rounds: int = 2
    halo_min_stars: int = 3
    halo_min_reach_fwhm: float = 10.0
    star_profile_min_snr: float | None = 300.0
    star_profile_radius: float = 40.0
    star_profile_radius_saturated: float = 160.0
    star_profile_inner_fwhm: float = 2.5
    star_profile_max_stars: int = 300
    star_profile_significance: float = 3.0
    stamp_fwhm_scaling: float = 2.5
    n_iter: int = 3
    max_residual_mean: float = 0.25
    max_residual_std: float = 1.5
    max_condition: float = 5e7
    bad_mask_planes: tuple = ("SAT", "BAD", "NO_DATA", "EDGE", "HIGH_VARIANCE")
    min_template_coverage: float = 0.1
    scale_variance: bool = True
    variance_scale_limit: float = 10.0
    decorrelate: bool = True
    model_error: float = 0.0
    isolation_flux_ratio: float = 0.5

    def __post_init__(self):
        if self.method not in ("alard-lupton", "zogy"):
            raise DiffimError(f"method must be 'alard-lupton' or 'zogy', got {self.method!r}")
        if self.convolve not in ("auto", "template", "science"):
            raise DiffimError(f"convolve must be 'auto', 'template' or 'science', got {self.convolve!r}")
        if not (len(self.degrees) == len(self.sigmas) == self.n_gaussians >= 1):
            raise DiffimError(f"n_gaussians={self.n_gaussians} needs as many degrees and sigmas, "
                              f"got {self.degrees} and {self.sigmas}")
        if self.kernel_size_min % 2 != 1 or self.kernel_size_max < self.kernel_size_min:
            raise DiffimError(f"kernel size range must be odd and ordered, got "
                              f"[{self.kernel_size_min}, {self.kernel_size_max}]")
        if self.spatial_order < 0 or self.background_order < 0:
            raise DiffimError("spatial_order and background_order must be >= 0")
        if self.min_kernel_stars < 1 or self.max_kernel_stars < self.min_kernel_stars:
            raise DiffimError(f"need 1 <= min_kernel_stars <= max_kernel_stars, got "
                              f"{self.min_kernel_stars}, {self.max_kernel_stars}")


@dataclass
class DiffimResult:
    """The result of ``subtract``.

    Attributes
    ----------
    difference : Exposure
        Science minus PSF-matched template in the science flux unit (nJy), with its variance,
        mask (see the module notes) and PSF (science PSF, template PSF when the science image
        was convolved, decorrelated; ``P_D`` for ZOGY). WCS, visit info and calibration are the
        science image's.
    matched_template : Exposure
        The template PSF-matched to the difference: convolved to the science PSF
        (Alard-Lupton, template convolved), scaled by ``1 / ksum`` (science convolved), or
        ``R * k_r`` (ZOGY); in science flux units, with the PSF to use for its forced
        photometry (``templateFlux``). Written as the ``matchedTemplate`` product.
    metadata : dict
        Kernel and fit diagnostics, QA metrics and timings (see ``subtract``).
    """

    difference: Exposure
    matched_template: Exposure
    metadata: dict
