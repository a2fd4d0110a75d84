"""Runs one experiment: python -m vlmjax.main --config=configs/FILE.py[:VARIANT] --workdir=DIR

  --config.a.b=value   overrides any field of the experiment (a typo fails with a hint)
  --workdir            local path or gs://bucket/path: config.json, metrics.jsonl, summary.json,
                       checkpoints/; rerunning the same command resumes (a finished run is not rerun)
  --verbose            on an error, print its traceback too (else one line: vlmjax: error: ...)
"""

from __future__ import annotations

import ast
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vlmjax import errors  # light: the handler below covers the heavy imports (jax) that follow

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/dtf.py or configs/dtf.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, metrics.jsonl and "
                    "config.json; a run resumes from its latest checkpoint.")
flags.DEFINE_bool("verbose", False, "On an error, print its full traceback before the one-line message "
                  "(also: environment variable VLMJAX_VERBOSE=1).")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value of ``--name=value`` / ``--name value`` (one dash works too) in ``argv``."""
    value = None
    for i, arg in enumerate(argv):
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                value = arg.split("=", 1)[1]
            elif arg == f"{dashes}{name}" and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def config_root(argv: list[str]) -> str:
    """The directory above ``configs/`` of the ``--config`` file (else the working directory).

    Experiment files import their shared pieces as ``from configs import common``; putting this on
    ``sys.path`` before absl loads the file makes that work from any working directory."""
    value = _flag_value(argv, "config")
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


def _experiment_files(argv: list[str]) -> str:
    """'configs/dtf.py, configs/lm.py, ...' under the --config file's root (else this checkout's)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (config_root(argv), os.getcwd(), checkout):
        found = [path for path, _, _ in experiments(root)]
        if found:
            return f"{', '.join(found)} (in {os.path.join(root, 'configs')}; --help lists their variants)"
    return "none found (no configs/ folder here)"


def _check_config_file(argv: list[str]) -> None:
    value = _flag_value(argv, "config")
    if value is None:
        return
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        raise errors.UserError(f"--config={value}: no experiment file {os.path.abspath(path)}; the "
                               f"experiments are {_experiment_files(argv)}.")


_REQUIRED = {
    "config": "the experiment file, e.g. --config=configs/lm.py:smoke",
    "workdir": "the run's directory (created if missing; rerun to resume), e.g. --workdir=/tmp/run",
}


def _flag_error(exc: Exception, argv: list[str]) -> BaseException:
    """absl / ml_collections' error while parsing ``argv``, as a UserError naming the flag and the fix."""
    field = errors.missing_field(exc)
    if field:  # --config.totl_steps=5 on the locked config
        key, hint = field
        overrides = [a.lstrip("-").split("=", 1)[0] for a in argv if re.match(r"--?(no)?config\.", a)]
        parts = next((o.split(".") for o in overrides if key in o.split(".")), ["config", key])
        path = ".".join(parts[:parts.index(key) + 1])
        return errors.UserError(f"{path}: no such field" + (f" (did you mean {hint!r}?)" if hint else
                                                            "; --config.FIELD=value sets existing fields"))
    if isinstance(exc, (SyntaxError, ImportError)):  # the experiment file itself
        where = f"{exc.filename} line {exc.lineno}: " if isinstance(exc, SyntaxError) else ""
        return errors.UserError(f"--config={_flag_value(argv, 'config')}: the experiment file does not load: "
                                f"{where}{exc.msg if isinstance(exc, SyntaxError) else exc}")
    if not isinstance(exc, flags.Error):
        return exc
    text = str(exc)
    m = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", text)
    if m:
        name = m[1]
        extra = f"; the experiments are {_experiment_files(argv)}" if name == "config" else ""
        return errors.UserError(f"--{name} is required: {_REQUIRED.get(name, 'give it a value')}{extra}.")
    m = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)$", text, re.S)
    if m and m[1] in FLAGS and "Error whilst parsing config file" not in text:
        kind = FLAGS[m[1]].flag_type()
        example = ""
        try:
            value = FLAGS["config"].value
            for key in m[1].split(".")[1:]:
                value = value[key]
            example = f", e.g. --{m[1]}={value}"
        except Exception:  # pylint: disable=broad-except
            pass
        reason = "" if kind == "bool" else f" ({m[3]})"  # absl's bool reason is a tuple's repr
        return errors.UserError(f"{m[1]}={m[2]}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
                                f"{example}{reason}")
    if isinstance(exc, flags.UnrecognizedFlagError):
        return errors.UserError(f"{text} (--help lists the flags; --config.FIELD=value sets a config field)")
    return exc


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(flags_parser=...)``), raising every error instead of absl's usage
    exit, so that ``cli`` prints it as one line."""
    try:
        rest = FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  (SystemExit of --help passes)
        _check_config_file(argv)  # a missing file fails later, hidden by the overrides that need it
        err = _flag_error(e, argv)
        if err is e:
            raise
        raise err from e
    _check_config_file(argv)
    return rest


def _check_workdir(workdir: str) -> None:
    """A local --workdir must be a directory or creatable as one."""
    if not workdir:
        raise errors.UserError(f"--workdir is empty: {_REQUIRED['workdir']}.")
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise errors.UserError(f"--workdir={workdir} {where}, not a directory; pass a directory path "
                               "(it is created if missing).")


def main(argv):
    if len(argv) > 1:
        raise errors.UserError(f"unexpected argument(s) {argv[1:]}: everything is a flag, --name=value "
                               "(--help lists them).")
    config = FLAGS.config
    _check_workdir(FLAGS.workdir)
    from vlmjax import distributed  # pylint: disable=g-import-not-at-top  (imports jax)
    distributed.maybe_initialize(config.distributed)
    from vlmjax import run  # pylint: disable=g-import-not-at-top  (after jax.distributed: nothing may touch devices before it)

    logging.set_verbosity(logging.WARNING)
    summary = run.run(config, FLAGS.workdir)
    # Ctrl-C stops cleanly (step finished, checkpoint saved) but the run was interrupted: 130, as a
    # shell expects. SIGTERM (preemption) exits 0: the scheduler reruns the command to resume.
    return 130 if summary.get("stopped_by") == "Ctrl-C" else 0


def _verbose(argv: list[str]) -> bool:
    if FLAGS.is_parsed() and FLAGS.verbose:
        return True
    return errors.verbose_requested(argv if not FLAGS.is_parsed() else [])  # + VLMJAX_VERBOSE=1


def cli(argv: list[str] | None = None) -> None:
    """``app.run(main)``: an error is printed as ONE last line on stderr, 'vlmjax: error: ...', and exits
    1 (Ctrl-C: 130); with --verbose or VLMJAX_VERBOSE=1 its traceback comes first."""
    argv = list(sys.argv if argv is None else argv)
    try:
        app.run(main, argv=argv, flags_parser=parse_flags)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):  # a normal exit, --help, absl's own exits
            raise
        _fail(e, argv, 1)
    except KeyboardInterrupt as e:
        _fail(e, argv, 130)
    except BaseException as e:  # pylint: disable=broad-except
        _fail(e, argv, 1)


def _fail(exc: BaseException, argv: list[str], code: int) -> None:
    try:
        verbose = _verbose(argv)
    except Exception:  # pylint: disable=broad-except
        verbose = True
    sys.stdout.flush()
    if verbose:
        traceback.print_exception(exc)
    print(errors.format_error(exc), file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    _root = config_root(sys.argv)
    sys.path.insert(0, _root)
    __doc__ = usage(_root)  # absl prints the main module's docstring for --help and usage errors
    cli()
