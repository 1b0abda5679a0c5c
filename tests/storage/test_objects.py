"""Object stores: a contract every implementation passes, run here on the local folder store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Generic, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import LocalObjectStore, ObjectNotFoundError, ObjectStore, validate_key

S = TypeVar("S", bound=ObjectStore)


class ObjectStoreContract(Generic[S]):
    """What every object store must do (zarr's StoreTests shape)."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> S:
        raise NotImplementedError

    def test_put_get_round_trip(self, store: S) -> None:
        store.put("a/b/c.dcm", b"\x00DICM\xff" * 1000)
        assert store.get("a/b/c.dcm") == b"\x00DICM\xff" * 1000
        assert store.exists("a/b/c.dcm")

    def test_put_replaces(self, store: S) -> None:
        store.put("k", b"old")
        store.put("k", b"new", sync=False)
        assert store.get("k") == b"new"

    def test_missing_key(self, store: S) -> None:
        assert not store.exists("nope")
        with pytest.raises(ObjectNotFoundError, match="nope"):
            store.get("nope")
        store.delete("nope")  # no error

    def test_iter_keys_sorted_with_prefix(self, store: S) -> None:
        for key in ("x/2", "x/1", "y/1"):
            store.put(key, key.encode())
        assert list(store.iter_keys()) == ["x/1", "x/2", "y/1"]
        assert list(store.iter_keys("x/")) == ["x/1", "x/2"]
        store.delete("x/1")
        assert list(store.iter_keys("x/")) == ["x/2"]

    @pytest.mark.parametrize(
        "key", ["", "../etc/passwd", "/abs", "a/../b", "a//b", ".hidden", "a/./b", "a b", "é"]
    )
    def test_unsafe_keys_refused(self, store: S, key: str) -> None:
        with pytest.raises(ValueError, match="key"):
            store.put(key, b"x")


class TestLocalObjectStore(ObjectStoreContract[LocalObjectStore]):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalObjectStore:
        return LocalObjectStore(tmp_path / "objects")

    def test_uri_is_file_uri_inside_root(self, store: LocalObjectStore) -> None:
        store.put("1.2.3/4.5", b"x")
        assert store.uri("1.2.3/4.5") == (store.root / "1.2.3" / "4.5").as_uri()

    def test_no_temporary_left_after_failed_write(self, store: LocalObjectStore) -> None:
        class Boom:
            def read(self, n: int) -> bytes:
                raise OSError("disk on fire")

        with pytest.raises(OSError, match="disk on fire"):
            store.put_stream("a/b", Boom())  # type: ignore[arg-type]
        assert os.listdir(store.root / "a") == []
        assert not store.exists("a/b")

    def test_failed_write_keeps_the_old_object(self, store: LocalObjectStore) -> None:
        store.put("k", b"old")

        class Half:
            calls = 0

            def read(self, n: int) -> bytes:
                self.calls += 1
                if self.calls > 1:
                    raise OSError("cut")
                return b"partial"

        with pytest.raises(OSError, match="cut"):
            store.put_stream("k", Half())  # type: ignore[arg-type]
        assert store.get("k") == b"old"


@given(st.text(min_size=1, max_size=80))
def test_validated_keys_stay_inside_the_root(key: str) -> None:
    root = Path("/store")
    try:
        validate_key(key)
    except ValueError:
        return
    resolved = (root / key).resolve()
    assert resolved.is_relative_to(root)
    assert ".." not in Path(key).parts
