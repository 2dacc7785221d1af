"""Snakemake adapter: simulate a DECam night (apsnake.sim.simulate_night)."""

from pathlib import Path

from apsnake.logs import finish_job, workflow_step
from apsnake.sim import simulate_night

with workflow_step("simulate", snakemake.log[0], f"preset={snakemake.params.preset}"):
    simulate_night(
        Path(snakemake.output.summary).parent,
        preset=snakemake.params.preset,
        seed=int(snakemake.params.seed),
    )

finish_job()
