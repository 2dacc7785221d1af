"""Simulation presets: which CCDs, visits, field and how many time-domain objects.

A preset fixes everything that is not random: the observing plan (EXPNUMs, UT start
times, band, exposure time), the simulated CCDs and the field. The seed given to
:func:`apsnake.sim.simulate_night` draws the rest (seeing, sky, pointing errors, sky
objects, instrument noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from apsnake.instruments import decam


@dataclass(frozen=True)
class VisitSpec:
    """One planned exposure.

    Attributes
    ----------
    expnum : int
        DECam exposure number (= visit id).
    start_utc : str
        UT start of the exposure, ISO format (``DATE-OBS``).
    is_template : bool
        True for the good-seeing template visits of the earlier night.
    """

    expnum: int
    start_utc: str
    is_template: bool

    @property
    def night(self) -> str:
        """Calibration night of this visit as ``YYMMDD`` (the UT date of the start)."""
        return datetime.fromisoformat(self.start_utc).strftime("%y%m%d")


@dataclass(frozen=True)
class Preset:
    """A simulated DECam night.

    Attributes
    ----------
    name : str
        Preset name (a key of :data:`PRESETS`).
    ccds : tuple of int
        Simulated CCDNUMs.
    band : str
        Band of every visit (``g``).
    exptime : float
        Exposure time of every visit, s.
    visits : tuple of VisitSpec
        Template visits first, then science visits, in time order.
    field_ra, field_dec : float
        Nominal telescope pointing (boresight, ICRS deg) around which visits are dithered.
    seed : int
        Default seed.
    n_transients, n_variables, n_asteroids : int
        Time-domain objects placed so that each lands on a simulated CCD in every science visit.
    n_bright_stars : int
        Extra bright (saturating) stars placed where every science visit sees them.
    signal_mag_range : tuple of float
        Range (g mag, uniform) of the science-minus-template signal of transients and
        variables: (19.5, 22.5) puts it at S/N ~ 10-200; the ``dense`` preset reaches below
        the detection limit to measure completeness.
    star_density_deg2 : float
        Stars per deg^2 brighter than g = 24 (high galactic latitude).
    galaxy_density_deg2 : float
        Galaxies per deg^2 brighter than g = 24.
    galaxy_mag_limit : float
        Faintest simulated galaxy, g mag (AB).
    star_mag_limit : float
        Faintest simulated star, g mag (AB).
    dither_radius_deg : tuple of float
        Range of the distance of each visit's pointing from the field centre, deg.
    pointing_error_arcsec : float
        RMS per axis of the true-minus-header pointing error, arcsec.
    template_fwhm_arcsec, science_fwhm_arcsec : tuple of float
        Ranges of the visit seeing (FWHM), arcsec.
    psf_beta_range : tuple of float
        Range of the Moffat index of the PSF core (stratified over the night's visits, so
        every night spans it; see ``observing.make_visit_conditions``). Pure Kolmogorov
        seeing is close to a Moffat of beta ~ 4.8 (Trujillo et al. 2001, MNRAS 328, 977);
        optics, guiding and wind shake make real cores shallower: the Legacy Surveys fit
        DECam PSFEx models over 1.8-5" with a free Moffat beta (bounded below at 1.8,
        2.2 assumed when the fit fails; legacypipe ``modify_psfex_profiles.py``). 2.5-4 lies
        between the two (the range named in issue 11; not a fit to a published distribution).
    psf_halo_fraction_range : tuple of float
        Range of the share of the flux in the PSF halo at the median focal-plane radius
        (stratified over the night's visits). 2-5 % in the wide beta = 2 Moffat puts, with the
        core's own wing, 1-6 % of a star's light beyond 3 FWHM, and a surface brightness at
        5-12" of the order of the Legacy Surveys' DECam g-band model (their inner Moffat plus
        an outer wing of 4.5e-4 r^-2 of the flux per arcsec^2, DR9/DR10 "PSF" page).
    psf_halo_width_range : tuple of float
        Range (uniform, drawn per visit) of the halo's FWHM in units of the visit seeing ("several
        core widths": 3-5 x 0.8-1.6" puts the halo's core radius at 2-6", where DIA ring
        residuals appear).
    refcat_mag_limit : float
        Faintest reference-catalogue star, r mag (about Gaia depth).
    object_name, propid : str
        ``OBJECT`` and ``PROPID`` header values.
    """

    name: str
    ccds: tuple[int, ...]
    band: str
    exptime: float
    visits: tuple[VisitSpec, ...]
    field_ra: float = 150.1
    field_dec: float = 2.2
    seed: int = 1
    n_transients: int = 18
    n_variables: int = 18
    n_asteroids: int = 4
    n_bright_stars: int = 4
    signal_mag_range: tuple[float, float] = (19.5, 22.5)
    star_density_deg2: float = 15000.0
    galaxy_density_deg2: float = 25000.0
    galaxy_mag_limit: float = 25.0
    star_mag_limit: float = 24.5
    dither_radius_deg: tuple[float, float] = (0.035, 0.075)
    pointing_error_arcsec: float = 2.5
    template_fwhm_arcsec: tuple[float, float] = (0.8, 1.0)
    science_fwhm_arcsec: tuple[float, float] = (1.0, 1.6)
    psf_beta_range: tuple[float, float] = (2.5, 4.0)
    psf_halo_fraction_range: tuple[float, float] = (0.02, 0.05)
    psf_halo_width_range: tuple[float, float] = (3.0, 5.0)
    refcat_mag_limit: float = 21.0
    object_name: str = "COSMOS sim"
    propid: str = "2015A-0000"
    refcat_bands: tuple[str, ...] = field(default=("g", "r", "i"))

    @property
    def templates(self) -> tuple[VisitSpec, ...]:
        return tuple(v for v in self.visits if v.is_template)

    @property
    def science(self) -> tuple[VisitSpec, ...]:
        return tuple(v for v in self.visits if not v.is_template)


def _plan(expnums, first_start: str, spacing_s: float, is_template: bool) -> tuple[VisitSpec, ...]:
    """Visits starting at ``first_start`` every ``spacing_s`` seconds (microsecond ISO times)."""
    t0 = datetime.fromisoformat(first_start)
    return tuple(
        VisitSpec(int(e), (t0 + timedelta(seconds=spacing_s * i)).isoformat(timespec="microseconds"), is_template)
        for i, e in enumerate(expnums)
    )


# Templates: three consecutive exposures near transit on 2015-02-17; science: a HiTS-like
# 20-minute cadence on 2015-03-17 so that asteroids move and fast transients evolve.
_DEMO_TEMPLATES = _plan((411371, 411372, 411373), "2015-02-17T04:31:07.254311", 121.3, True)
_DEMO_SCIENCE = _plan(range(419802, 419807), "2015-03-17T02:12:43.681522", 1201.7, False)

PRESETS: dict[str, Preset] = {
    "demo": Preset(
        name="demo", ccds=(25, 32), band="g", exptime=90.0,
        visits=_DEMO_TEMPLATES + _DEMO_SCIENCE,
        n_transients=18, n_variables=18, n_asteroids=4, n_bright_stars=4,
    ),
    "test": Preset(
        name="test", ccds=(25, 32), band="g", exptime=90.0,
        visits=_DEMO_TEMPLATES[:2] + _DEMO_SCIENCE[:2],
        n_transients=10, n_variables=10, n_asteroids=3, n_bright_stars=4,
    ),
    # Many faint time-domain objects, for completeness and flux-pull statistics near the
    # detection limit (difference-image S/N ~ 2-60).
    "dense": Preset(
        name="dense", ccds=(25, 32), band="g", exptime=90.0,
        visits=_DEMO_TEMPLATES[:2] + _DEMO_SCIENCE[:2],
        n_transients=120, n_variables=120, n_asteroids=4, n_bright_stars=4,
        signal_mag_range=(21.0, 24.5),
    ),
    # A crowded field: the demo's observing plan pointed at galactic latitude b = +12 deg
    # (l = 271 deg, RA as the demo's so the hour angles and airmasses stay those of a field
    # near transit), with 6x the demo's star density (90 000 stars deg^-2 brighter than
    # g = 24, 25 per arcmin^2); galaxies as in the demo.
    "crowded": Preset(
        name="crowded", ccds=(25, 32), band="g", exptime=90.0,
        visits=_DEMO_TEMPLATES + _DEMO_SCIENCE,
        field_ra=150.1, field_dec=-40.0,
        n_transients=18, n_variables=18, n_asteroids=4, n_bright_stars=4,
        star_density_deg2=90000.0, object_name="crowded sim",
    ),
    # A whole focal plane (issue 14): every science CCD in service on the demo's nights (the
    # instrument module's outages: all 62 but N30 and S30, so 60), one template and two science
    # visits of the demo plan (association links the two science visits). Time-domain objects
    # at the `test` preset's density per CCD (5 transients and 5 variables), one asteroid and
    # one bright (saturating) star per CCD. Not run in CI: ~180 CCD images to simulate.
    "focalplane": Preset(
        name="focalplane", ccds=decam.working_ccdnums(_DEMO_SCIENCE[0].start_utc), band="g", exptime=90.0,
        visits=_DEMO_TEMPLATES[:1] + _DEMO_SCIENCE[:2],
        n_transients=300, n_variables=300, n_asteroids=60, n_bright_stars=60,
    ),
}
