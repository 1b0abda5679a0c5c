"""imgindex.config: defaults < ROOT/imgindex.toml < IMGINDEX_* < overrides."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from imgindex.config import SETTINGS_HELP, Settings, load_settings
from imgindex.errors import ConfigError
from imgindex.schema import DEFAULT_ATTRIBUTES


def write_toml(root: Path, body: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "imgindex.toml").write_text(body, encoding="utf-8")


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.root == Path("imgindex-data")
    assert settings.workers == len(os.sched_getaffinity(0))
    assert (settings.batch_rows, settings.force, settings.extra_attributes) == (20_000, False, ())
    assert settings.attributes == DEFAULT_ATTRIBUTES
    assert settings.tables_dir == Path("imgindex-data") / "tables"


def test_each_source_overrides_the_weaker(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_toml(
        root,
        "[imgindex]\n"
        "workers = 3\n"
        "batch_rows = 10\n"
        "force = true\n"
        'extra_attributes = ["StudyComments"]\n',
    )
    from_file = load_settings({"root": root}, environ={})
    assert (from_file.workers, from_file.batch_rows, from_file.force) == (3, 10, True)
    assert from_file.extra_attributes == ("StudyComments",)

    environ = {"IMGINDEX_BATCH_ROWS": "20", "IMGINDEX_FORCE": "no"}
    from_env = load_settings({"root": root}, environ=environ)
    assert (from_env.workers, from_env.batch_rows, from_env.force) == (3, 20, False)

    given = load_settings({"root": root, "batch_rows": 30, "workers": None}, environ=environ)
    # None means "not given": workers still comes from the file.
    assert (given.workers, given.batch_rows, given.force) == (3, 30, False)


def test_root_comes_from_the_environment_or_overrides(tmp_path: Path) -> None:
    env_root, flag_root = tmp_path / "env", tmp_path / "flag"
    write_toml(env_root, "[imgindex]\nbatch_rows = 7\n")
    write_toml(flag_root, "[imgindex]\nbatch_rows = 8\n")
    environ = {"IMGINDEX_ROOT": str(env_root)}
    assert load_settings(environ=environ).root == env_root
    assert load_settings(environ=environ).batch_rows == 7  # the toml of that root
    settings = load_settings({"root": str(flag_root)}, environ=environ)
    assert (settings.root, settings.batch_rows) == (flag_root, 8)


def test_default_root_toml_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "imgindex-data", "[imgindex]\nworkers = 2\n")
    assert load_settings(environ={}).workers == 2


def test_environment_values_are_parsed(tmp_path: Path) -> None:
    environ = {
        "IMGINDEX_ROOT": str(tmp_path),
        "IMGINDEX_WORKERS": " 4 ",
        "IMGINDEX_FORCE": "TRUE",
        "IMGINDEX_EXTRA_ATTRIBUTES": "StudyComments, BodyPartThickness,,",
    }
    settings = load_settings(environ=environ)
    assert settings.workers == 4
    assert settings.force is True
    assert settings.extra_attributes == ("StudyComments", "BodyPartThickness")
    extra = [a.keyword for a in settings.attributes[len(DEFAULT_ATTRIBUTES) :]]
    assert extra == ["StudyComments", "BodyPartThickness"]
    assert settings.attributes[: len(DEFAULT_ATTRIBUTES)] == DEFAULT_ATTRIBUTES


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[imgindex]\nworker = 2\n", r"unknown setting\(s\) \['worker'\]"),
        ('[imgindex]\nworkers = "many"\n', "setting 'workers'"),
        ("[imgindex]\nforce = 2\n", "setting 'force'"),
        ("[imgindex]\nworkers = 0\n", "workers must be at least 1"),
        ("[imgindex]\nbatch_rows = -1\n", "batch_rows must be at least 1"),
        ('[imgindex]\nextra_attributes = ["NotAKeyword"]\n', "'NotAKeyword' is not a DICOM"),
        ('[imgindex]\nextra_attributes = ["ReferencedImageSequence"]\n', "VR SQ"),
        ("[imgindex\n", "imgindex.toml"),
    ],
)
def test_bad_toml_is_a_config_error(tmp_path: Path, toml: str, message: str) -> None:
    write_toml(tmp_path, toml)
    with pytest.raises(ConfigError, match=message):
        load_settings({"root": tmp_path}, environ={})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IMGINDEX_WORKERS", "abc", "IMGINDEX_WORKERS"),
        ("IMGINDEX_FORCE", "maybe", "'maybe' is not a boolean"),
        ("IMGINDEX_EXTRA_ATTRIBUTES", "StudyComments,Nope", "'Nope' is not a DICOM keyword"),
    ],
)
def test_bad_environment_is_a_config_error(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({"root": tmp_path}, environ={name: value})


def test_bad_overrides_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'Bogus' is not a DICOM keyword"):
        load_settings({"root": tmp_path, "extra_attributes": "Bogus"}, environ={})
    with pytest.raises(ConfigError, match="option: setting 'batch_rows'"):
        load_settings({"root": tmp_path, "batch_rows": "lots"}, environ={})
    with pytest.raises(ConfigError, match="extra_attributes"):
        Settings(extra_attributes=("PatientNme",))
    assert issubclass(ConfigError, ValueError)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().workers = 2  # type: ignore[misc]


def test_every_setting_has_help() -> None:
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert list(SETTINGS_HELP) == fields
    assert all(text.strip() for text in SETTINGS_HELP.values())
