"""Fixtures of the peer tests: private Orthanc servers on loopback (:mod:`peers.orthanc`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from peers.orthanc import Orthanc, OrthancFactory, start_orthanc

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc with the DICOMweb plugin and default options, stopped after the test.

    No authentication, no limit on find results, ``StableAge`` of 1 s; free HTTP and DICOM
    ports on 127.0.0.1.
    """
    server = start_orthanc(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Start Orthancs with special options; every one is stopped after the test.

    Call it as ``orthanc_factory(overrides={"LimitFindResults": 2}, users={"alice": "pw"})``;
    see :func:`peers.orthanc.start_orthanc`.
    """
    started: list[Orthanc] = []

    def factory(
        *, overrides: Mapping[str, Any] | None = None, users: Mapping[str, str] | None = None
    ) -> Orthanc:
        server = start_orthanc(tmp_path, overrides, users)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in reversed(started):
            server.stop()
