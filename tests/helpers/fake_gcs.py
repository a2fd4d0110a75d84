"""An offline stand-in for Google Cloud Storage: ``gs://`` paths of ``etils.epath`` land in a local dir.

Without TensorFlow, etils' gs backend asks fsspec for the "gcs" filesystem (normally gcsfs). Here
that protocol (and "gs") is registered to :class:`FakeGCSFileSystem`, a ``DirFileSystem`` over the
local filesystem rooted at a temp directory, so ``epath.Path("gs://bucket/run/x.json")`` is the
file ``<root>/bucket/run/x.json``.

By default the fake also behaves like an object store where that matters to code written for a
POSIX disk (``strict=True``; these are gcsfs' documented behaviours):

* ``mkdir``/``makedirs`` below a bucket do nothing: GCS has no directories.
* A "directory" exists only while some object lies under it, so an empty folder does not exist
  (``exists``/``is_dir`` are False and listings skip it), and ``rename`` into a folder that holds
  nothing yet fails in etils ("folder ... does not exist").
* Writing creates the parents implicitly; a move creates the destination's parents.
* Append mode is not supported: gcsfs warns and OVERWRITES (``open("a")`` == ``open("w")``).

Use it as a context manager (``with fake_gcs(tmp_path) as root: ...``) or through the pytest
fixture ``fake_gcs_root`` (import it into a test module). The registry, fsspec's instance cache
and etils' cached filesystem are restored/cleared on exit, so it works even when a gs:// path was
touched before.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Iterator

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")


class FakeGCSFileSystem(DirFileSystem):
    """``gs://bucket/key`` -> ``<root>/bucket/key`` on the local disk. ``root`` is set per use."""

    protocol = PROTOCOLS
    root: str | None = None  # set by fake_gcs()
    strict: bool = True

    def __init__(self, *args, **storage_options):
        # etils passes finalize_on_close=True (a gcsfs option); anything else gcsfs takes is moot.
        storage_options.clear()
        if self.root is None:
            raise RuntimeError("FakeGCSFileSystem used outside fake_gcs().")
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = os.fspath(path)
        for proto in PROTOCOLS:
            for sep in ("://", "::"):
                if path.startswith(proto + sep):
                    path = path[len(proto) + len(sep):]
        return path.strip("/")

    # --- object-store semantics -----------------------------------------------------------------

    def _local(self, path) -> str:
        return self._join(path)

    def _has_objects(self, local_dir: str) -> bool:
        for _, _, files in os.walk(local_dir):
            if files:
                return True
        return False

    def _is_bucket(self, path) -> bool:
        return "/" not in self._strip_protocol(path)

    def _visible(self, path) -> bool:
        local = self._local(path)
        if os.path.isfile(local):
            return True
        if not os.path.isdir(local):
            return False
        return (not self.strict) or self._is_bucket(path) or self._has_objects(local)

    def exists(self, path, **kwargs):
        return self._visible(path)

    def isdir(self, path):
        return os.path.isdir(self._local(path)) and self._visible(path)

    def isfile(self, path):
        return os.path.isfile(self._local(path))

    def info(self, path, **kwargs):
        if not self._visible(path):
            raise FileNotFoundError(path)
        return super().info(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        if not self._visible(path):
            raise FileNotFoundError(path)
        out = super().ls(path, detail=True, **kwargs)
        out = [e for e in out if e["type"] != "directory" or self._visible(e["name"])]
        return out if detail else [e["name"] for e in out]

    def mkdir(self, path, create_parents=True, **kwargs):
        if self.strict and not self._is_bucket(path):
            return  # gcsfs: "will have no effect because GCS doesn't have real directories"
        os.makedirs(self._local(path), exist_ok=True)

    def makedirs(self, path, exist_ok=False):
        if self.strict and not self._is_bucket(path):
            return
        os.makedirs(self._local(path), exist_ok=exist_ok)

    def mv(self, path1, path2, **kwargs):
        if not self._visible(path1):
            raise FileNotFoundError(path1)
        dst = self._local(path2)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        return super().mv(path1, path2, **kwargs)

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode and self.strict:
            warnings.warn("Append mode 'a' is not supported in GCS. Using overwrite mode instead.")
            mode = mode.replace("a", "w")
        if "r" in mode and not os.path.isfile(self._local(path)):
            raise FileNotFoundError(path)
        return super().open(path, mode, *args, **kwargs)


def _clear_caches():
    FakeGCSFileSystem.clear_instance_cache()
    from etils.epath import backend as backend_lib  # pylint: disable=g-import-not-at-top
    backend_lib._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@contextlib.contextmanager
def fake_gcs(root, *, strict: bool = True) -> Iterator[str]:
    """Within the block, ``gs://`` and ``gcs://`` paths (epath and fsspec) live under ``root``."""
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    saved = {p: registry.get(p) for p in PROTOCOLS}
    saved_tf = gpath._is_tf_installed  # pylint: disable=protected-access
    old_root, old_strict = FakeGCSFileSystem.root, FakeGCSFileSystem.strict
    FakeGCSFileSystem.root, FakeGCSFileSystem.strict = root, strict
    for p in PROTOCOLS:
        fsspec.register_implementation(p, FakeGCSFileSystem, clobber=True)
    gpath._is_tf_installed = lambda: False  # with TensorFlow, etils would use tf.io.gfile instead
    _clear_caches()
    try:
        yield root
    finally:
        gpath._is_tf_installed = saved_tf
        for p, cls in saved.items():
            if cls is None:
                registry.pop(p, None)
            else:
                registry[p] = cls
        FakeGCSFileSystem.root, FakeGCSFileSystem.strict = old_root, old_strict
        _clear_caches()


try:  # a fixture for test modules that `from helpers.fake_gcs import fake_gcs_root`
    import pytest

    @pytest.fixture
    def fake_gcs_root(tmp_path):
        """The local directory that holds the fake buckets (``gs://b/x`` is ``<root>/b/x``)."""
        with fake_gcs(tmp_path / "fake_gcs") as root:
            yield root
except ImportError:  # pragma: no cover
    pass
