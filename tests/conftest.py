"""Shared fixtures."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


@pytest.fixture(scope="session")
def sim_test_night(tmp_path_factory):
    """The ``test`` simulation preset (seed 1), generated once per session.

    Returns the summary dict of ``apsnake.sim.simulate_night`` (paths relative to
    ``summary["outdir"]``, which is absolute).
    """
    from apsnake.sim import simulate_night

    return simulate_night(tmp_path_factory.mktemp("sim_test_night"), preset="test", seed=1)


@pytest.fixture(scope="session")
def sim_test_dir(sim_test_night):
    """Folder of the simulated ``test`` night (raw/, calib/, refcat.parquet, truth/)."""
    from pathlib import Path

    return Path(sim_test_night["outdir"])
