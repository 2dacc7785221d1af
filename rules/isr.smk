# ISR: raw CCD + bias + flat (+ BPM, + crosstalk sources in the same raw file) -> postISR.
# With step_jobs: merged (the default) ISR runs in the processCcd job (rules/calibrate.smk).

from apsnake.registry import CalibrationNotFound, CalibrationSelector


def isr_calibrations(wildcards):
    """Calibration choice for a data ID; a missing one becomes an error of that job only."""
    selector = registry_table(ingest_output().calibs, "selector", CalibrationSelector)
    try:
        chosen = selector.select(exposure_row(wildcards))
    except CalibrationNotFound as err:
        return {"error": str(err)}
    out = {"error": ""}
    for kind, value in chosen.items():
        out[kind], out[f"{kind}_hdu"] = value if value else ("", -1)
    return out


def isr_inputs(wildcards):
    inputs = {"raw": exposure_row(wildcards)["raw_path"]}
    calibs = isr_calibrations(wildcards)
    for kind in ("bias", "flat", "bpm"):
        if calibs.get(kind):
            inputs[kind] = calibs[kind]
    return inputs


# step_jobs merged with keep_postisr false: processCcd does not write the postISR image at all,
# and this rule makes one only when it is asked for as a target (the JSON is processCcd's).
ISR_OUTPUTS = (
    dict(exposure=intermediate(product("postISR")), metadata=product("postISR", "json"))
    if STEP_JOBS == "separate" else dict(exposure=product("postISR"))
)


if STEP_JOBS == "separate" or not KEEP_POSTISR:

    rule isr:
        input:
            unpack(isr_inputs),
        output:
            **ISR_OUTPUTS,
        log:
            f"{OUT}/logs/isr/{{visit}}/isr_{{visit}}_{{detector}}.log",
        benchmark:
            f"{OUT}/benchmarks/isr/{{visit}}/isr_{{visit}}_{{detector}}.tsv"
        params:
            calibs=isr_calibrations,
            options=config["isr"],
        threads: 1
        resources:
            mem_mb=1500,
            runtime=10,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/isr.py"
