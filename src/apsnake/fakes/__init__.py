"""Fake injection: PSF-shaped point sources injected into a calexp and its difference image,
detected and measured as the pipeline does, and matched (Rubin's source injection for AP).

Modules
-------
``config``  ``FakesConfig`` (the ``fakes`` section of config.yaml), ``FakesError``
``select``  ``fake_data_id_selected``, ``select_fake_data_ids``: which data IDs get fakes
``place``   ``place_fakes``: hosts from the src table, then random good pixels, kept apart
``inject``  ``render_fakes``, ``expected_snr_sigma``; why injecting into the difference image is exact
``match``   ``match_fakes``: one-to-one nearest DiaSource with ``pixelFlags_injectedCenter``
``run``     ``run_fakes``: one data ID end to end, the ``Fake`` table (``apsnake.schema``)

Fakes never reach the APDB or the alerts: they live only in the per-data-ID ``fakes`` files.
docs/algorithms.md (Fakes) describes the method.
"""

from apsnake.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "FakesConfig": "config", "FakesError": "config",
    "FakesResult": "run", "run_fakes": "run",
    "fake_data_id_selected": "select", "select_fake_data_ids": "select",
})

__all__ = ["FakesConfig", "FakesError", "FakesResult", "fake_data_id_selected", "run_fakes",
           "select_fake_data_ids"]
