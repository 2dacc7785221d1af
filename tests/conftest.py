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


@pytest.fixture(scope="session")
def workflow_run(sim_test_dir, tmp_path_factory):
    """The whole workflow run once on the ``test`` night (``--cores 2``), after a dry run.

    Returns (folder, config path, dry-run process, run process); the products are under
    ``folder / "out"``. Shared by test_workflow.py and test_alerts_workflow.py.
    """
    from workflow_helpers import _config, _run

    tmp_path = tmp_path_factory.mktemp("workflow")
    config = _config(sim_test_dir, tmp_path)
    dry = _run(tmp_path, config, "-n")
    run = _run(tmp_path, config)
    return tmp_path, config, dry, run
