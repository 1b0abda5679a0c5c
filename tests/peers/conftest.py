"""Fixtures of the peer tests: private Orthanc servers (:mod:`peers.orthanc`) and PostgreSQL
servers (:mod:`peers.postgres`) on loopback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from peers.orthanc import Orthanc, OrthancFactory, start_orthanc
from peers.postgres import Postgres, start_postgres

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


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL server for the test module, stopped after its last test.

    A private cluster on a free port of 127.0.0.1, ``trust`` authentication on loopback only;
    connect with :attr:`Postgres.url` (database ``imgindex``, superuser ``imgindex``).
    """
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()
