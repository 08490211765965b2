"""The command line as a new user meets it: flags that mean one thing, help on every option, messages that fit
what was typed; plus the seams the redesign introduced (one config mechanism, one raw-dataset writer, one
validation of variant inputs, sampler provenance, the draws-log header)."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from lefusion_nnunet.cli.main import build_parser, main
from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.raw_writer import (check_dataset_id_free, dataset_id_of, dataset_name, derived_dataset_name,
                                             raw_dataset_folder)
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import DenoiserConfig, SamplerConfig, ScheduleConfig
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration.swap_dataset import DRAWS_LOG_HEADER, read_draws
from lefusion_nnunet.integration.trainer_settings import TrainerSettings
from lefusion_nnunet.phantoms import generate_phantom
from lefusion_nnunet.training.loop import TrainConfig
from lefusion_nnunet.validation import resolve_region_label
from lefusion_nnunet.variant_settings import VariantSettings, sampler_record


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help():
    missing = []
    for name, sub in _subcommands(build_parser()).items():
        if not sub.description:
            missing.append(f"{name}: no description")
        for action in sub._actions:
            if action.help is None and action.option_strings and action.dest != "help":
                missing.append(f"{name} {'/'.join(action.option_strings)}")
    assert not missing, missing


def test_enlarge_destination_flag_and_deprecated_o(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    sub = _subcommands(build_parser())["enlarge"]
    assert sub.parse_args(["-d", "501", "--destination", "502"]).destination == "502"
    assert main(["enlarge", "-d", "501", "-o", "502"]) == 2  # parsed, then the missing source is reported
    err = capsys.readouterr().err
    assert "deprecated" in err and "--destination 502" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # one of the two is required
        sub.parse_args(["-d", "501"])


def test_phantom_on_an_existing_dataset_names_the_flag(tmp_path, capsys):
    args = ["phantom", "-o", str(tmp_path), "--cases", "2", "--shape", "32", "32", "16"]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset501_LeFusionChestPhantom"]  # nothing half-written


def test_missing_checkpoint_does_not_ask_for_the_flag_given(tmp_path, capsys):
    image = tmp_path / "img.nii.gz"
    rc = main(["synthesize", "--checkpoint", str(tmp_path / "missing.pt"), "-i", str(image), "--mask", str(image),
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt does not exist" in err and "pass --checkpoint" not in err


def test_raw_writer_names_and_clashes(tmp_path):
    assert dataset_name(7, "Chest") == "Dataset007_Chest"
    assert dataset_id_of("Dataset502_X") == 502 and dataset_id_of("Chest") is None
    assert derived_dataset_name(502, "Dataset501_Chest") == "Dataset502_ChestLeFusion"
    with pytest.raises(LeFusionInputError):
        dataset_name(1000, "X")
    (tmp_path / "Dataset502_Other").mkdir()
    with pytest.raises(LeFusionInputError, match="already used"):
        check_dataset_id_free("Dataset502_Mine", [tmp_path])
    check_dataset_id_free("Dataset503_Mine", [tmp_path])
    with pytest.raises(LeFusionInputError, match="could not write"):  # ITK's write error: one sentence, no leftovers
        with raw_dataset_folder(tmp_path / "Dataset503_Mine") as partial:
            assert (partial / "imagesTr").is_dir() and (partial / "labelsTr").is_dir()
            raise RuntimeError("ITK: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset502_Other"]


def test_generate_phantom_refuses_unknown_kind(tmp_path):
    with pytest.raises(LeFusionInputError, match="unknown phantom kind"):
        generate_phantom("brain", tmp_path)


@pytest.mark.parametrize("config", [
    ScheduleConfig(), DenoiserConfig.from_preset("tiny", image_channels=2), TrainConfig(max_minutes=3.5),
    RoiGeometry((8, 16, 16), (2.5, 0.7, 0.7)), IntensitySpace("percentile"),
    DataConfig(dataset_name="Dataset501_X", lesion_labels=(2, 3), label_names=("a", "b"), region_label=1, channel=0,
               modality="CT", roi=RoiGeometry((8, 16, 16), (1.0, 1.0, 1.0)), intensity=IntensitySpace()),
    VariantSettings(size_mm=(6.0, 9.0), center_mm=(1.0, -2.0, 3.0), sampler={"num_steps": 10}),
    TrainerSettings(checkpoint="/x.pt", variants=VariantSettings(per_case=3))])
def test_configs_round_trip_through_one_mechanism(config):
    assert isinstance(config, JsonConfig)
    d = config.to_dict()
    assert all(not isinstance(v, tuple) for v in d.values())  # JSON-safe
    assert type(config).from_dict(d) == config
    with pytest.raises(LeFusionInputError, match="unknown"):
        type(config).from_dict({**d, "no_such_field": 1})


def test_cli_choices_match_the_library():
    from lefusion_nnunet.cli.common import AUTO_REGION_CHOICES, MASK_SOURCE_CHOICES, SAMPLER_CHOICES
    from lefusion_nnunet.diffusion.sampler_config import SAMPLER_NAMES
    from lefusion_nnunet.variant_settings import AUTO_REGIONS, MASK_SOURCES

    assert set(SAMPLER_CHOICES) == set(SAMPLER_NAMES) and set(MASK_SOURCE_CHOICES) == set(MASK_SOURCES)
    assert set(AUTO_REGION_CHOICES) == set(AUTO_REGIONS)


def test_variant_count_defaults_are_the_library_defaults():
    from lefusion_nnunet.integration.trainer_settings import DEFAULT_PER_CASE
    from lefusion_nnunet.variant_settings import VariantSettings

    subs = _subcommands(build_parser())
    assert subs["trainer-config"].parse_args(["-d", "501"]).per_case == DEFAULT_PER_CASE
    assert subs["enlarge"].parse_args(["-d", "501", "--destination", "x"]).per_case == VariantSettings().per_case


def test_train_command_defaults_are_the_library_defaults():
    sub = _subcommands(build_parser())["train"]
    args = sub.parse_args(["-d", "501", "--lesion-label", "2"])
    defaults = TrainConfig()
    assert (args.steps, args.batch_size, args.lr, args.border_ring) == (defaults.steps, defaults.batch_size,
                                                                      defaults.lr, defaults.border_ring)
    assert args.roi_size is None  # planned from the lesions


def test_provenance_records_only_the_fields_a_sampler_uses():
    assert set(sampler_record(SamplerConfig(name="repaint"))) == {"name", "jump_length", "jump_n_sample"}
    ddim = sampler_record(SamplerConfig(name="ddim"))
    assert "jump_length" not in ddim and ddim["num_steps"] == 10


def test_region_label_resolution():
    data = dataclasses.make_dataclass("D", [("region_label", int)])(1)
    assert resolve_region_label(VariantSettings(), data) == 1
    assert resolve_region_label(VariantSettings(region_label=3), data) == 3
    assert resolve_region_label(VariantSettings(region_label=3, region_masks_dir="/masks"), data) is None


def test_draws_log_header_is_skipped_when_counting(tmp_path):
    log = tmp_path / "lefusion_draws.log"
    log.write_text(DRAWS_LOG_HEADER + "S\tcase1\tcase1_lefusion000\nR\tcase2\tcase2\n")
    stats = read_draws(log)
    assert stats.loads == 2 and stats.synthetic == 1 and stats.variants == ("case1_lefusion000",)
