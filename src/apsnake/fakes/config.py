"""Options of fake injection (``FakesConfig``) and the stage's error type."""

from __future__ import annotations

from dataclasses import dataclass

from apsnake.errors import ApsnakeError


class FakesError(ApsnakeError, ValueError):
    """Options or inputs that do not allow fake injection."""


@dataclass
class FakesConfig:
    """Options of ``run_fakes`` (the ``fakes`` section of config.yaml).

    Attributes
    ----------
    fraction : float
        Fraction of the science data IDs that get fakes, chosen deterministically per data ID
        from ``seed``, visit and detector (``fake_data_id_selected``); 0 turns fakes off.
    n_per_ccd : int
        Fakes placed on each selected data ID (fewer when the good area is too small to keep
        them ``min_separation`` apart).
    snr_min, snr_max : float
        Range of the expected PSF-fit S/N on the difference image, drawn log-uniform.
    host_fraction : float
        Share of the fakes placed on galaxies of the calexp's ``src`` table (extended sources,
        see ``host_min_flux_ratio``), at a random offset within the galaxy's size
        sqrt((ixx + iyy) / 2) of its centroid (``onHost``). When there are too few galaxies
        the rest are placed at random.
    host_min_flux_ratio : float
        A src source is extended (a galaxy) when its 12-px aperture flux is at least this
        times its aperture-corrected PSF flux, and larger by 3 sigma (stars: 1.00 +/- 0.02).
    host_min_snr : float
        Smallest detection S/N of a galaxy used as a host.
    edge_margin : int
        Fakes are at least this many pixels from the image edges.
    min_separation : float
        Smallest distance between two fakes, and between a fake and a bright star, pixels.
    avoid_star_snr : float or None
        Src sources that are not extended and have a detection S/N at least this (and saturated
        ones) are "bright stars", kept ``min_separation`` away from the fakes; None: none avoided.
    match_radius : float
        A fake is recovered by a DiaSource within this distance, pixels (about half a FWHM).
    bad_planes : tuple of str
        Difference-image mask planes that no pixel of a fake's 3x3 centre may carry.
    seed : int
        Positions, hosts and fluxes are drawn from a generator seeded by (seed, visit, detector).
    """

    fraction: float = 1.0
    n_per_ccd: int = 80
    snr_min: float = 3.0
    snr_max: float = 30.0
    host_fraction: float = 0.2
    host_min_flux_ratio: float = 1.15
    host_min_snr: float = 10.0
    edge_margin: int = 20
    min_separation: float = 25.0
    avoid_star_snr: float | None = 50.0
    match_radius: float = 2.0
    bad_planes: tuple = ("NO_DATA", "BAD", "SAT", "EDGE")
    seed: int = 0

    def __post_init__(self):
        checks = (
            (0.0 <= self.fraction <= 1.0, "fraction must be in [0, 1]"),
            (int(self.n_per_ccd) >= 0, "n_per_ccd must be >= 0"),
            (0.0 < self.snr_min <= self.snr_max, "need 0 < snr_min <= snr_max"),
            (0.0 <= self.host_fraction <= 1.0, "host_fraction must be in [0, 1]"),
            (self.host_min_flux_ratio > 0, "host_min_flux_ratio must be > 0"),
            (int(self.edge_margin) >= 0, "edge_margin must be >= 0"),
            (self.min_separation >= 0, "min_separation must be >= 0"),
            (self.match_radius > 0, "match_radius must be > 0"),
        )
        for ok, message in checks:
            if not ok:
                raise FakesError(f"fakes options: {message}")
        self.bad_planes = tuple(self.bad_planes)
