"""Runs one experiment: python -m vlmjax.main --config=configs/FILE.py[:VARIANT] --workdir=DIR

  --config.a.b=value   overrides any field of the experiment (a typo fails with a hint)
  --workdir            local path or gs://bucket/path: config.json, metrics.jsonl, summary.json,
                       checkpoints/; rerunning the same command resumes (a finished run is not rerun)
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vlmjax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/dtf.py or configs/dtf.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, metrics.jsonl and "
                    "config.json; a run resumes from its latest checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_root(argv: list[str]) -> str:
    """The directory above ``configs/`` of the ``--config`` file (else the working directory).

    Experiment files import their shared pieces as ``from configs import common``; putting this on
    ``sys.path`` before absl loads the file makes that work from any working directory."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            path = os.path.abspath(value.split(":", 1)[0])
            return os.path.dirname(os.path.dirname(path))
    return os.getcwd()


def experiments(root: str) -> list[tuple[str, tuple[str, ...], str]]:
    """[(configs/FILE.py, variants, first docstring line)] of the experiment files under ``root``,
    read without importing them (their VARIANTS tuple and docstring)."""
    out = []
    folder = os.path.join(root, "configs")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".py") or name.startswith("_") or name == "common.py":
            continue
        with open(os.path.join(folder, name)) as f:
            module = ast.parse(f.read())
        doc = (ast.get_docstring(module) or "").strip().splitlines()
        variants: tuple[str, ...] = ()
        for node in module.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "VARIANTS" for t in node.targets):
                variants = tuple(ast.literal_eval(node.value))
        out.append((f"configs/{name}", variants, doc[0] if doc else ""))
    return out


def usage(root: str) -> str:
    lines = [__doc__.rstrip(), "", f"Experiments ({os.path.join(root, 'configs')}; :VARIANT picks a variant, "
             "default first):"]
    for path, variants, doc in experiments(root):
        lines.append(f"  {path:<22} {doc}")
        if variants:
            lines.append(f"  {'':<22} variants: {', '.join(variants)}")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    distributed.maybe_initialize(config.distributed)
    from vlmjax import run  # pylint: disable=g-import-not-at-top  (after jax.distributed: nothing may touch devices before it)

    logging.set_verbosity(logging.WARNING)
    run.run(config, FLAGS.workdir)


if __name__ == "__main__":
    _root = _config_root(sys.argv)
    sys.path.insert(0, _root)
    __doc__ = usage(_root)  # absl prints the main module's docstring for --help and usage errors
    app.run(main)
