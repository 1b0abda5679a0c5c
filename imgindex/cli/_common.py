"""Flags shared by subcommands."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from imgindex.config import SETTINGS_HELP, Settings, load_settings

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping


def add_root(parser: argparse.ArgumentParser) -> None:
    """``--root ROOT`` (default ``$IMGINDEX_ROOT`` or ``./imgindex-data``)."""
    parser.add_argument(
        "--root", default=None, help=SETTINGS_HELP["root"] + "; or set IMGINDEX_ROOT"
    )


def settings_from(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the environment, ROOT/imgindex.toml and the parsed flags."""
    return load_settings({"root": args.root, **(extra or {})}, environ=os.environ)


def is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are shown only there)."""
    return os.isatty(2)


def stop_on_signals(command: str, doing: str) -> threading.Event:
    """An event SIGTERM and SIGINT set, saying on stderr what ``command`` does next
    (``doing``); a second signal aborts with KeyboardInterrupt."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            f"imgindex {command}: {signal.Signals(signum).name}, {doing} (again to abort)",
            file=sys.stderr,
        )
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop
