"""Config layering: defaults <- YAML <- --set, with unknown keys and wrong types as clear errors."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from ifnet.config import parse_overrides, resolve, to_dict
from ifnet.errors import DataError, UsageError


@dataclass
class Optim:
    lr: float = 1e-3
    epochs: int = 30
    amsgrad: bool = True


@dataclass
class Run:
    name: str = "run"
    weights: Optional[str] = None
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def test_layering_defaults_yaml_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.002\n  epochs: 5\nname: iu\n")
    cfg = resolve(Run, cfg_file, ["optim.epochs=7", "tags=[a, b]", "weights=/w.pth"])
    assert cfg.optim.lr == 0.002 and cfg.optim.epochs == 7 and cfg.optim.amsgrad is True
    assert cfg.name == "iu" and cfg.tags == ["a", "b"] and cfg.weights == "/w.pth"
    assert to_dict(cfg) == {"name": "iu", "weights": "/w.pth", "tags": ["a", "b"],
                            "optim": {"lr": 0.002, "epochs": 7, "amsgrad": True}}


def test_misspelled_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"unknown key\(s\) optim\.amsgard"):
        resolve(Run, None, ["optim.amsgard=false"])


def test_bool_is_not_truthy_string():
    # R2Gen's `type=bool` made "--amsgrad False" True; here it is a type error.
    with pytest.raises(DataError, match=r"optim\.amsgrad.*true/false"):
        resolve(Run, None, ["optim.amsgrad=maybe"])
    assert resolve(Run, None, ["optim.amsgrad=false"]).optim.amsgrad is False


def test_int_field_rejects_float():
    with pytest.raises(DataError, match=r"optim\.epochs.*integer"):
        resolve(Run, None, ["optim.epochs=2.5"])


@pytest.mark.parametrize("text, value", [("2e-3", 2e-3), ("1E4", 1e4), ("-.5e1", -5.0), ("3", 3.0)])
def test_float_field_takes_exponent_notation(tmp_path, text, value):
    # YAML 1.1 parses "2e-3" (no dot) as a string; in --set and in a YAML file it is still a number.
    assert resolve(Run, None, [f"optim.lr={text}"]).optim.lr == value
    (tmp_path / "c.yaml").write_text(f"optim:\n  lr: {text}\n")
    assert resolve(Run, tmp_path / "c.yaml", []).optim.lr == value
    with pytest.raises(DataError, match=r"optim\.lr.*number"):
        resolve(Run, None, ["optim.lr=2e"])


def test_bad_override_syntax():
    with pytest.raises(UsageError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(DataError, match=r"bad\.yaml: invalid YAML at line"):
        resolve(Run, bad)


@pytest.mark.parametrize("setting, field, message", [
    ("optim.epochs=0", "optim.epochs", "must be >= 1, got 0"),
    ("optim.lr_rest=0", "optim.lr_rest", "must be > 0"),
    ("optim.ema_decay=1", "optim.ema_decay", "must be in (0, 1) or null"),
    ("optim.report_label_smoothing=1", "optim.report_label_smoothing", "must be in [0, 1)"),
    ("optim.label_forcing=1.5", "optim.label_forcing", "must be in [0, 1]"),
    ("data.batch_size=0", "data.batch_size", "must be >= 1"),
    ("data.iec=sharpen", "data.iec", "must be one of none, clahe, adaptive"),
    ("data.repeat_threshold=-0.1", "data.repeat_threshold", "must be > 0 or null"),
    ("data.repeat_reweight_labels=true", "data.repeat_reweight_labels", "needs data.repeat_threshold"),
    ("eval.beam_size=0", "eval.beam_size", "must be >= 1"),
    ("eval.guidance=-1", "eval.guidance", "must be a finite number >= 0"),
    ("eval.guidance=.inf", "eval.guidance", "must be a finite number >= 0"),
    ("eval.uncertain=maybe", "eval.uncertain", "must be one of positive, negative"),
])
def test_training_settings_out_of_range_are_one_line_errors_naming_the_field(tmp_path, setting, field, message):
    from ifnet.train.config import TrainConfig

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("seed: 1\n")
    with pytest.raises(DataError) as info:
        resolve(TrainConfig, cfg_file, [setting])
    text = str(info.value)
    assert info.value.field == field and message in text and "\n" not in text
    assert text.startswith(f"{cfg_file} + --set: field '{field}': "), text


def test_training_defaults_and_presets_pass_the_range_checks():
    from pathlib import Path

    from ifnet.train.config import TrainConfig

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in [None, *configs]:
        resolve(TrainConfig, path, [])
