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

from apsnake.fakes.config import FakesConfig, FakesError
from apsnake.fakes.run import FakesResult, run_fakes
from apsnake.fakes.select import fake_data_id_selected, select_fake_data_ids

__all__ = ["FakesConfig", "FakesError", "FakesResult", "fake_data_id_selected", "run_fakes",
           "select_fake_data_ids"]
