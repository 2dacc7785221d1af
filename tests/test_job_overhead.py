"""A workflow job's fixed cost: lazy package namespaces and the fast exit of ``logs.finish_job``."""

import importlib
import json
import os
import subprocess
import sys

import pytest

LAZY_PACKAGES = ["alerts", "association", "fakes", "qa", "sim", "templates"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_package_exports_every_name(package):
    module = importlib.import_module(f"apsnake.{package}")
    for name in module.__all__:
        assert getattr(module, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name
    namespace = {}
    exec(f"from apsnake.{package} import *", namespace)
    assert set(module.__all__) <= set(namespace)


def test_dag_imports_leave_out_the_heavy_stages():
    """What rules/*.smk import to build the DAG loads neither scipy nor the stages' modules."""
    loaded = _modules_after(
        "from apsnake.association.plan import association_plan\n"
        "from apsnake.fakes import select_fake_data_ids\n"
        "from apsnake.templates.skygrid import SkyGrid"
    )
    assert not {"scipy", "pandas", "pyarrow", "apsnake.association.match", "apsnake.fakes.run",
                "apsnake.templates.warp"} & loaded


def test_alert_jobs_load_no_association_stage():
    """package_alerts and produce_alerts import neither the association matcher nor scipy."""
    loaded = _modules_after("from apsnake.alerts import AlertConfig, KafkaConfig, package_data_id, produce_alert_file")
    assert not {"scipy", "apsnake.association.match"} & loaded
    loaded = _modules_after("from apsnake.alerts import KafkaConfig, produce_alert_file")
    assert not {"pandas", "apsnake.apdb", "apsnake.alerts.package"} & loaded


def test_finish_job_flushes_the_log_and_exits_zero(tmp_path):
    log = tmp_path / "job.log"
    code = (
        "import atexit\n"
        "from apsnake.logs import finish_job, workflow_step\n"
        "atexit.register(print, 'teardown ran')\n"
        f"with workflow_step('step', {str(log)!r}, 'visit=1 detector=2') as logger:\n"
        "    logger.info('last record')\n"
        "print('stdout flushed', end='')\n"
        "finish_job()\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout == "stdout flushed"
    text = log.read_text()
    assert "last record" in text and "step visit=1 detector=2: done in" in text


def test_warp_and_dipole_psf_load_no_scipy_interpolate():
    """The template and DIA jobs' splines are numerics.CubicSpline1d: scipy.interpolate (0.35-0.5 s
    per process) stays unloaded."""
    loaded = _modules_after(
        "import numpy as np\n"
        "from apsnake.templates.mapping import interp_matrix\n"
        "from apsnake.dia.dipole import ShiftedPsf\n"
        "assert interp_matrix(np.array([0.0, 64, 128, 192, 255]), 256).shape == (256, 5)\n"
        "y, x = np.mgrid[-7:8, -7:8]\n"
        "psf = ShiftedPsf(np.exp(-(x ** 2 + y ** 2) / 8.0))\n"
        "assert psf.image(np.arange(10.0), np.arange(12.0), 4.3, 5.6).shape == (12, 10)"
    )
    assert "apsnake.dia.dipole" in loaded and "scipy.interpolate" not in loaded


_REALLOCATE = (
    "import json, resource, numpy as np\n"
    "{setup}\n"
    "a = np.ones(64 << 18, np.float32)  # 64 MiB, above glibc's largest automatic mmap threshold\n"
    "del a\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "b = np.ones(64 << 18, np.float32)\n"
    "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))\n"
)


def _page_faults_of_a_second_array(setup: str) -> int:
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}  # 4 KiB pages: one fault per page touched
    out = subprocess.run([sys.executable, "-c", _REALLOCATE.format(setup=setup)], capture_output=True, text=True,
                         check=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_job_reuses_freed_memory_instead_of_faulting_in_new_pages(tmp_path):
    """A job frees and allocates CCD-sized arrays all the time; ``workflow_step`` makes the
    process keep freed memory, so the next array of that size reuses it instead of faulting in
    (and zeroing) 16,384 fresh pages."""
    fresh = _page_faults_of_a_second_array("")
    assert fresh > 10_000  # the default: a fresh mapping per large array
    in_a_job = _page_faults_of_a_second_array(
        "from apsnake.logs import workflow_step\n"
        f"with workflow_step('step', {str(tmp_path / 'job.log')!r}, 'visit=1 detector=2'):\n"
        "    pass")
    assert in_a_job < 1_000
