"""Workdirs on gs:// (etils.epath): metrics, JSON files and the corrupt-checkpoint quarantine on an
offline fake bucket (tests/helpers/fake_gcs.py, with object-store semantics), and the orbax
checkpointer given an ``epath.Path`` (local: orbax writes arrays through tensorstore, whose gcs
driver needs the network)."""

import os
import warnings

import fsspec
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath

from helpers.fake_gcs import fake_gcs, fake_gcs_root  # noqa: F401 - fake_gcs_root is a fixture
from vlmjax.train import checkpoint as ckpt_lib
from vlmjax.train import metrics as metrics_lib


def _config():
    return ml_collections.ConfigDict({"wandb": {"mode": "disabled"}})


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty current directory: a mangled gs:// path (``gs:/bucket/...``) would show up in it."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    yield d
    assert os.listdir(d) == [], f"something was written under the current directory: {os.listdir(d)}"


def _files(root):
    return sorted(os.path.relpath(os.path.join(a, f), root) for a, _, fs in os.walk(root) for f in fs)


def test_fake_gcs_backend(fake_gcs_root, cwd):
    p = epath.Path("gs://bucket/run/x.json")
    assert not p.exists()
    p.parent.mkdir(parents=True, exist_ok=True)
    assert not p.parent.exists()  # object store: no empty directories
    p.write_text("a")
    assert p.read_text() == "a" and p.exists() and p.parent.is_dir()
    assert [q.name for q in epath.Path("gs://bucket/run").iterdir()] == ["x.json"]
    p.rename(p.with_name("y.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with epath.Path("gs://bucket/run/y.json").open("a") as f:  # gcsfs: append == overwrite
            f.write("b")
    assert epath.Path("gs://bucket/run/y.json").read_text() == "b"
    with fsspec.open("gcs://bucket/run/y.json", "r") as f:  # fsspec's other name for it
        assert f.read() == "b"
    assert _files(fake_gcs_root) == ["bucket/run/y.json"]


def test_fake_gcs_resets_a_cached_filesystem(tmp_path, cwd):
    for i in range(2):  # etils caches the filesystem on its backend: each use must see its own root
        with fake_gcs(tmp_path / f"root{i}") as root:
            epath.Path(f"gs://b/{i}.txt").write_text(str(i))
            assert _files(root) == [f"b/{i}.txt"]


def test_metric_writer_on_gs(fake_gcs_root, cwd):
    w = metrics_lib.MetricWriter("gs://bucket/run", _config(), flush_every_s=3600)
    assert os.fspath(w.path) == "gs://bucket/run/metrics.jsonl"
    w.write(1, {"loss": np.float32(2.5)})  # the first record is uploaded at once
    assert metrics_lib.read_metrics("gs://bucket/run") == [{"step": 1, "kind": "train", "loss": 2.5}]
    w.write(2, {"loss": 2.0})
    w.write(2, {"acc": 0.5}, kind="eval")
    w.close()
    assert [r["step"] for r in metrics_lib.read_metrics("gs://bucket/run", "train")] == [1, 2]
    # A resumed run appends (an object store cannot: the old records are re-uploaded with the new).
    w = metrics_lib.MetricWriter("gs://bucket/run", _config())
    w.write(3, {"loss": 1.5})
    w.close()
    assert [r["step"] for r in metrics_lib.read_metrics("gs://bucket/run")] == [1, 2, 2, 3]
    assert _files(fake_gcs_root) == ["bucket/run/metrics.jsonl"]


def test_metric_writer_local_appends(tmp_path, cwd):
    for step in (1, 2):
        w = metrics_lib.MetricWriter(epath.Path(tmp_path) / "run", _config())
        w.write(step, {"loss": 1.0})
        assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path / "run"))] == list(range(1, step + 1))
        w.close()


def test_write_read_json(fake_gcs_root, tmp_path, cwd):
    obj = {"a": 1, "b": [1.5, "x"], "c": {"d": None}, "n": np.int32(3)}
    want = {**obj, "n": 3}
    for path in ("gs://bucket/run/summary.json", str(tmp_path / "run" / "summary.json"),
                 epath.Path(tmp_path) / "run2" / "config.json"):
        out = metrics_lib.write_json(path, obj)
        assert os.fspath(out) == os.fspath(path)
        assert metrics_lib.read_json(path) == want
        metrics_lib.write_json(path, {"a": 2})  # overwrite
        assert metrics_lib.read_json(path) == {"a": 2}
    assert _files(fake_gcs_root) == ["bucket/run/summary.json"]
    assert _files(tmp_path / "run") == ["summary.json"]  # no .tmp left behind
    with pytest.raises(FileNotFoundError):
        metrics_lib.read_json("gs://bucket/run/nope.json")


def test_as_path_keeps_uris():
    assert os.fspath(metrics_lib.as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert os.fspath(metrics_lib.as_path("rel")) == os.path.abspath("rel")


def test_quarantine_on_gs(fake_gcs_root, cwd):
    step_dir = epath.Path("gs://bucket/run/checkpoints/6")
    (step_dir / "state" / "array").write_text("garbage")
    (epath.Path("gs://bucket/run/checkpoints/3") / "state" / "array").write_text("ok")
    dst = ckpt_lib.quarantine_step("gs://bucket/run/checkpoints", 6, "ValueError: truncated")
    assert os.fspath(dst).startswith("gs://bucket/run/corrupt_checkpoints/6.")
    assert (dst / "state" / "array").read_text() == "garbage"
    assert not step_dir.exists()
    assert (epath.Path("gs://bucket/run/checkpoints/3") / "state" / "array").exists()
    assert "truncated" in (dst.parent / f"{dst.name}.reason.txt").read_text()
    # The same step corrupt again (saved anew, unreadable again): both copies are kept.
    (step_dir / "state" / "array").write_text("garbage 2")
    dst2 = ckpt_lib.quarantine_step("gs://bucket/run/checkpoints", 6)
    assert dst2 != dst and (dst2 / "state" / "array").read_text() == "garbage 2"
    assert ckpt_lib.quarantine_step("gs://bucket/run/checkpoints", 9) is None
    assert all(f.startswith("bucket/run/") for f in _files(fake_gcs_root))


def test_checkpointer_on_gs_opens_and_prints_the_uri(fake_gcs_root, cwd):
    ck = ckpt_lib.Checkpointer("gs://bucket/run/checkpoints", keep=2, every=1, async_save=False)
    assert ck.directory == "gs://bucket/run/checkpoints"
    assert ck.all_steps() == []
    ck.close()
    with pytest.raises(FileNotFoundError, match="gs://bucket/other has no checkpoints/"):
        ckpt_lib.load_params("gs://bucket/other")


def _tiny(value):
    return {"params": {"w": jnp.full((4,), value, jnp.float32)}, "step": jnp.int32(value)}


def _data_iter():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_checkpointer_with_epath_saves_restores_and_quarantines(tmp_path, cwd):
    directory = epath.Path(tmp_path) / "checkpoints"
    ck = ckpt_lib.Checkpointer(directory, keep=3, every=1, async_save=False)
    assert ck.directory == str(directory)
    it = _data_iter()
    for step in (1, 2):
        next(it)
        assert ck.save(step, _tiny(step), it, {"step": step})
    ck.wait()
    assert ck.all_steps() == [1, 2]
    assert ck.saved_config(2) == {"step": 2}
    ck.close()

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _tiny(0))
    ck = ckpt_lib.Checkpointer(str(directory), keep=3, every=1, async_save=False)
    it = _data_iter()
    state, step = ck.restore_latest(abstract, it)
    assert step == 2 and float(state["params"]["w"][0]) == 2.0 and next(it) == 2
    # Truncate the newest step: it is moved to corrupt_checkpoints/ and step 1 is restored.
    for root, _, files in os.walk(directory / "2" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    it = _data_iter()
    state, step = ck.restore_latest(abstract, it)
    assert step == 1 and float(state["params"]["w"][0]) == 1.0 and next(it) == 1
    assert ck.all_steps() == [1]
    assert [p.name for p in (directory.parent / "corrupt_checkpoints").glob("2.*") if p.is_dir()]
    ck.close()
    params, step = ckpt_lib.load_params(epath.Path(tmp_path), "")
    assert step == 1 and float(params["w"][1]) == 1.0
