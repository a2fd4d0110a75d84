"""How much a finished VQA model uses vision: python -m vlmjax.diagnose --workdir=DIR

  --workdir   the run's folder (local or gs://): the experiment's WORKDIR as given to vlmjax.main
              (for an experiment with stages, its WORKDIR/<task> folder is found), or that folder
  --split     val: the task's held-out eval batches (the only split a task gives)
  --out       where diagnostics.json and the PNG plots go (default: WORKDIR/diagnostics)
  --verbose   on an error, print its traceback too (else one line: vlmjax: error: ...)

Prints a table (accuracy per question type with real / shuffled / blank images, the vision-dependency
drops, dataset-bias baselines, the question-only baseline, feature diversity, gates) and writes
diagnostics.json (+ PNGs with matplotlib). docs/diagnostics.md says what each number means.
The same report is written after training with --config.diagnose_at_end=True.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from vlmjax import errors  # light: the handler below covers the heavy imports (jax) that follow

# Its own FlagValues: vlmjax.main's flags (--workdir, --verbose) live in absl's global FLAGS, and both
# modules may be imported by one process (the tests).
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The finished run's folder (WORKDIR of vlmjax.main, or its "
                    "WORKDIR/<task>).", flag_values=FLAGS)
flags.DEFINE_string("split", "val", "Eval split: val (the task's held-out eval batches).", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Output folder for diagnostics.json and the plots ('' = WORKDIR/diagnostics).",
                    flag_values=FLAGS)
flags.DEFINE_bool("verbose", False, "On an error, print its full traceback before the one-line message "
                  "(also: environment variable VLMJAX_VERBOSE=1).", flag_values=FLAGS)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses ``argv`` into FLAGS (fresh each call); a bad flag is a UserError."""
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise errors.UserError(f"{e} (--help lists the flags)") from e
    if len(rest) > 1:
        raise errors.UserError(f"unexpected argument(s) {rest[1:]}: everything is a flag, --name=value "
                               "(--help lists them).")
    if FLAGS.split not in ("val", "eval"):
        raise errors.UserError(f"--split={FLAGS.split!r}: the diagnostics run on the task's held-out eval "
                               "batches; use --split=val.")
    if not FLAGS.workdir:
        raise errors.UserError("--workdir is required: the folder of a finished run, e.g. "
                               "--workdir=/tmp/vlm_smoke (trained with python -m vlmjax.main --config=configs/"
                               "trm_vlm_qa.py:smoke --workdir=/tmp/vlm_smoke).")
    return rest


def main(argv: list[str]) -> dict:
    """Parses the flags and runs the diagnostics; returns the report."""
    parse_flags(argv)
    workdir = FLAGS.workdir
    if "://" not in workdir and not os.path.isdir(workdir):
        raise errors.UserError(f"--workdir={workdir}: no such directory; train a run there first, e.g. "
                               f"python -m vlmjax.main --config=configs/trm_vlm_qa.py:smoke --workdir={workdir}.")
    from vlmjax import run  # pylint: disable=g-import-not-at-top  (imports jax)
    logging.set_verbosity(logging.WARNING)
    return run.diagnose_workdir(workdir, FLAGS.out or None, split=FLAGS.split)


def cli(argv: list[str] | None = None) -> None:
    """Runs ``main``; --help prints the usage. An error is printed as ONE last line on stderr,
    'vlmjax: error: ...', exit code 1 (Ctrl-C: 130); with --verbose its traceback comes first."""
    errors.run_cli(main, list(sys.argv if argv is None else argv),
                   __doc__.rstrip() + "\n\nflags:\n" + FLAGS.get_help())


if __name__ == "__main__":
    cli()
