# The embedded default: a simulated DECam night in the real raw format (config key `simulate`).

if SIMULATE:
    SIM_SUMMARY = f"{SIMULATE['outdir']}/sim_summary.json"

    rule simulate:
        output:
            summary=SIM_SUMMARY,
        log:
            logs("simulate"),
        benchmark:
            bench("simulate")
        params:
            preset=SIMULATE["preset"],
            seed=SIMULATE["seed"],
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/simulate.py"
