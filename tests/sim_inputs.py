"""ISR inputs of one data ID of a simulated night, chosen through the registry as the
workflow chooses them (shared by the ISR and calibration tests)."""

from apsnake import registry
from apsnake.instruments import decam_files


def isr_inputs(sim_dir, visit: int, ccd: int):
    """(raw, {"bias", "flat", "bpm"} arrays) of data ID (visit, ccd)."""
    reg = registry.build_registry(registry.find_input_files(sim_dir / "raw"),
                                  registry.find_input_files(sim_dir / "calib"))
    row = reg.exposures[(reg.exposures["visit"] == visit) & (reg.exposures["detector"] == ccd)].iloc[0]
    chosen = registry.select_calibrations(reg.calibs, row)
    calibs = {kind: decam_files.read_master_calibration(value[0], ccd, value[1])[0] if value else None
              for kind, value in chosen.items()}
    return decam_files.read_raw_ccd(row["raw_path"], ccd), calibs
