"""Simulated DECam nights in the real raw format, with calibrations, a reference catalogue
and truth tables (``apsnake simulate OUTDIR --preset demo|test|dense|crowded --seed N``).

Modules: :mod:`~apsnake.sim.presets` (what is observed), :mod:`~apsnake.sim.observing`
(conditions and WCS of each visit), :mod:`~apsnake.sim.sky` (stars, galaxies, time-domain
objects, refcat), :mod:`~apsnake.sim.render` (PSF and stamps), :mod:`~apsnake.sim.signature`
(bias, flat, defects, cosmic rays, saturation, crosstalk), :mod:`~apsnake.sim.writer`
(FITS output) and :mod:`~apsnake.sim.night` (the driver).
"""

from apsnake.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "simulate_night": "night",
    "PRESETS": "presets", "Preset": "presets", "VisitSpec": "presets",
})

__all__ = ["PRESETS", "Preset", "VisitSpec", "simulate_night"]
