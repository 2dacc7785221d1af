"""dataclass_from_options: one workflow config section -> one stage dataclass."""

from dataclasses import dataclass, field

import pytest

from apsnake.errors import ApsnakeError
from apsnake.options import dataclass_from_options


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


def test_all_unknown_keys_named_and_default_error_is_value_error():
    with pytest.raises(ValueError) as info:
        dataclass_from_options(StageConfig, {"zzz": 1, "aaa": 2}, "dia")
    assert type(info.value) is ValueError
    assert "dia" in str(info.value) and "zzz" in str(info.value) and "aaa" in str(info.value)
