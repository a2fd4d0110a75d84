"""Every experiment file in configs/: each variant builds, locks, resolves and names a real task."""

import os

import pytest

from conftest import ROOT, load_config, run_module

from vlmjax import main as main_lib
from vlmjax import tasks
from vlmjax.train import config as train_config

EXPERIMENTS = main_lib.experiments(ROOT)
CASES = [(path, v) for path, variants, _ in EXPERIMENTS for v in variants]


def test_every_config_file_declares_variants():
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".py") and not f.startswith("_") and f != "common.py")
    assert [p for p, _, _ in EXPERIMENTS] == [f"configs/{f}" for f in files]
    for path, variants, doc in EXPERIMENTS:
        assert variants and variants[:2] == ("default", "smoke"), path
        assert doc, f"{path} has no docstring"
    assert "configs/video_cls.py" in [p for p, _, _ in EXPERIMENTS]


@pytest.mark.parametrize("path,variant", CASES, ids=[f"{p[8:-3]}:{v}" for p, v in CASES])
def test_config_builds_locks_and_names_a_task(path, variant):
    name = os.path.basename(path)[:-3]
    c = load_config(name, variant)
    assert c.is_locked
    c.to_dict()  # every FieldReference resolves
    with pytest.raises(AttributeError, match="total_steps"):  # a typo fails with a hint
        c.totl_steps = 3
    tasks.task_class(c.task)
    train_config.validate(c)
    with open(os.path.join(ROOT, path)) as f:
        assert f"--config={path}" in f.read(), f"{path}: the docstring shows no command"
    for stage in c.get("stages", {}).values():
        tasks.task_class(stage.task)
        train_config.validate(stage)


def test_unknown_variant_has_a_hint():
    with pytest.raises(ValueError, match="did you mean 'smoke'"):
        load_config("dtf", "smok")


def test_routed_configs_share_the_baseline_sizes():
    base = load_config("lm")
    for name in ("mod", "dtf", "tdtf"):
        c = load_config(name)
        assert c.model.to_dict() == base.model.to_dict(), name
        assert c.data.to_dict() == base.data.to_dict(), name
        assert (c.total_steps, c.batch_size, c.optim.lr) == (base.total_steps, base.batch_size, base.optim.lr)
        assert c.routing.kind == name


def test_help_lists_experiments_and_variants():
    r = run_module(["-m", "vlmjax.main", "--help"], timeout=120)  # absl exits 1 after --help
    assert "Experiments" in r.stdout, r.stderr
    for path, variants, _ in EXPERIMENTS:
        assert path in r.stdout
        assert ", ".join(variants) in r.stdout
