"""Settings: one typed object, with a default and help text per setting.

Each setting can be given, from weakest to strongest, by its default, the ``[imgindex]``
table of ``ROOT/imgindex.toml``, an ``IMGINDEX_<NAME>`` environment variable, or a CLI flag.
``docs/configuration.md`` lists them; a test checks that every setting is documented there.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.errors import ConfigError
from imgindex.schema import Attribute, attributes_for

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["SETTINGS_HELP", "Settings", "load_settings"]

#: Default catalog root, relative to the working directory.
DEFAULT_ROOT = Path("imgindex-data")


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Settings:
    """Everything imgindex can be told; see :data:`SETTINGS_HELP`."""

    root: Path = DEFAULT_ROOT
    extra_attributes: tuple[str, ...] = ()
    workers: int = field(default_factory=_default_workers)
    batch_rows: int = 20_000
    force: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, not {self.workers}")
        if self.batch_rows < 1:
            raise ConfigError(f"batch_rows must be at least 1, not {self.batch_rows}")
        try:
            attributes_for(self.extra_attributes)
        except ValueError as exc:
            raise ConfigError(f"extra_attributes: {exc}") from exc

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        """The indexed attributes: defaults plus :attr:`extra_attributes`."""
        return attributes_for(self.extra_attributes)

    @property
    def tables_dir(self) -> Path:
        """Where the index tables live: ``ROOT/tables``."""
        return self.root / "tables"


#: Help text per setting (also the CLI's and docs/configuration.md's).
SETTINGS_HELP: dict[str, str] = {
    "root": "catalog folder holding tables/, objects/, emr/ and wal/ (default ./imgindex-data)",
    "extra_attributes": "DICOM keywords indexed as columns beyond the defaults "
    "(comma-separated in the environment, a list in imgindex.toml)",
    "workers": "processes parsing headers in parallel (default: the CPUs this process may use)",
    "batch_rows": "instances per index commit; larger batches mean fewer table versions",
    "force": "also index files without the 128-byte preamble and 'DICM' prefix (as pydicom's "
    "force=True)",
}


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    try:
        if kind == "Path":
            return Path(value)
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if kind == "int":
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"{value!r} is not a boolean")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: setting {name!r}: {exc}") from exc
    return value  # pragma: no cover - every field type is handled above


def load_settings(
    overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from defaults, ``ROOT/imgindex.toml``, ``IMGINDEX_*`` and ``overrides``.

    ``overrides`` (e.g. CLI flags) win; a value of None there means "not given".

    Raises
    ------
    ConfigError
        For an unknown setting in imgindex.toml, or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = [f.name for f in dataclasses.fields(Settings)]
    env = {
        n: _coerce(n, environ[f"IMGINDEX_{n.upper()}"], f"IMGINDEX_{n.upper()}")
        for n in names
        if f"IMGINDEX_{n.upper()}" in environ
    }
    root = Path(given.get("root") or env.get("root") or DEFAULT_ROOT)
    from_file: dict[str, Any] = {}
    toml_path = root / "imgindex.toml"
    if toml_path.is_file():
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{toml_path}: {exc}") from exc
        table = data.get("imgindex", {})
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ConfigError(f"{toml_path}: unknown setting(s) {unknown}; known: {names}")
        from_file = {k: _coerce(k, v, str(toml_path)) for k, v in table.items()}
    merged = {**from_file, **env, **{k: _coerce(k, v, "option") for k, v in given.items()}}
    merged["root"] = root
    return Settings(**merged)
