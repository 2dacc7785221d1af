"""dataclass_from_options: one workflow config section -> one stage dataclass."""

from dataclasses import dataclass, field

import pytest

from apsnake.errors import ApsnakeError
from apsnake.options import OptionsError, dataclass_from_options


@dataclass
class StageConfig:
    threshold: float = 5.0
    planes: tuple = ("BAD", "SAT")
    name: str = "default"
    extra: dict = field(default_factory=dict)


class StageError(ApsnakeError, ValueError):
    pass


@pytest.mark.parametrize("options", [None, {}])
def test_empty_options_give_defaults(options):
    assert dataclass_from_options(StageConfig, options, "stage") == StageConfig()


def test_given_keys_override_and_missing_keep_defaults():
    cfg = dataclass_from_options(StageConfig, {"threshold": 3.5}, "stage")
    assert cfg.threshold == 3.5
    assert cfg.planes == ("BAD", "SAT") and cfg.name == "default" and cfg.extra == {}


def test_lists_become_tuples_other_values_unchanged():
    extra = {"a": [1, 2]}
    cfg = dataclass_from_options(StageConfig, {"planes": ["CR", "EDGE", "NO_DATA"], "name": "x", "extra": extra},
                                 "stage")
    assert cfg.planes == ("CR", "EDGE", "NO_DATA") and isinstance(cfg.planes, tuple)
    assert cfg.name == "x"
    assert cfg.extra is extra  # a mapping is passed through as it is
    assert dataclass_from_options(StageConfig, {"planes": []}, "stage").planes == ()


def test_options_dict_is_not_modified():
    options = {"planes": ["CR"], "threshold": 7.0}
    dataclass_from_options(StageConfig, options, "stage")
    assert options == {"planes": ["CR"], "threshold": 7.0}


def test_unknown_key_raises_given_error_naming_section_and_key():
    with pytest.raises(StageError) as info:
        dataclass_from_options(StageConfig, {"threshold": 4.0, "treshold": 4.0}, "detection", StageError)
    message = str(info.value)
    assert "detection" in message and "treshold" in message
    # The known option names are listed to help fix the typo.
    for name in ("threshold", "planes", "name", "extra"):
        assert name in message


def test_all_unknown_keys_named_and_default_error_is_an_options_error():
    with pytest.raises(OptionsError) as info:
        dataclass_from_options(StageConfig, {"zzz": 1, "aaa": 2}, "dia")
    # Bad input, not a bug: the workflow logs it as one line naming the section (and exits 1).
    assert isinstance(info.value, ApsnakeError) and isinstance(info.value, ValueError)
    assert "dia" in str(info.value) and "zzz" in str(info.value) and "aaa" in str(info.value)


@dataclass
class StepConfig:
    sip_order: int = 3
    limits: tuple = (1.0, 2.0)


@dataclass
class NestedConfig:
    margin: float = 400.0
    step: StepConfig = field(default_factory=StepConfig)


def test_nested_sections_build_nested_dataclasses():
    cfg = dataclass_from_options(NestedConfig, {"step": {"sip_order": 4}, "margin": 10}, "calibrate")
    assert cfg == NestedConfig(margin=10, step=StepConfig(sip_order=4))
    nested_lists = dataclass_from_options(StepConfig, {"limits": [[1, 2], [3, 4]]}, "step")
    assert nested_lists.limits == ((1, 2), (3, 4))  # YAML lists at any depth become tuples
    with pytest.raises(OptionsError, match=r"calibrate\.step option\(s\) sip_ordre"):
        dataclass_from_options(NestedConfig, {"step": {"sip_ordre": 4}}, "calibrate")


def test_every_stage_section_of_the_default_config_builds_its_options():
    """config.yaml's sections (with the schema's defaults) are the options dataclasses' fields."""
    from pathlib import Path

    import yaml

    from apsnake.association import AssociationConfig
    from apsnake.calibrate import CalibrateConfig
    from apsnake.dia import DiaConfig
    from apsnake.diffim import DiffimConfig
    from apsnake.isr import IsrConfig
    from apsnake.templates import CoaddConfig

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    built = {
        "isr": dataclass_from_options(IsrConfig, config["isr"], "isr"),
        "calibrate": dataclass_from_options(CalibrateConfig, config["calibrate"], "calibrate"),
        "coadd": dataclass_from_options(CoaddConfig, config["templates"]["coadd"], "templates.coadd"),
        "diffim": dataclass_from_options(DiffimConfig, config["diffim"], "diffim"),
        "dia": dataclass_from_options(DiaConfig, config["dia"], "dia"),
        "association": dataclass_from_options(AssociationConfig, config["association"], "association"),
    }
    assert built["calibrate"].psf.min_snr == config["calibrate"]["psf"]["min_snr"]
    assert built["calibrate"].astrometry.max_rms_arcsec == config["calibrate"]["astrometry"]["max_rms_arcsec"]
    assert built["diffim"].kernel_star_snr == tuple(config["diffim"]["kernel_star_snr"])
    assert built["isr"].crosstalk is config["isr"]["crosstalk"]


def test_the_schemas_simulate_presets_are_the_simulators():
    """config.schema.yaml's list of presets is the simulator's (a preset added to one must be
    added to the other)."""
    from pathlib import Path

    import yaml

    from apsnake.sim.presets import PRESETS

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.schema.yaml").read_text())
    assert sorted(schema["properties"]["simulate"]["properties"]["preset"]["enum"]) == sorted(PRESETS)
