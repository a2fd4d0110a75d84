"""Every bad input to ``python -m vlmjax.main`` ends in ONE line on stderr, 'vlmjax: error: ...', naming
the field or file and the fix, with exit code 1 and no traceback (``--verbose`` adds it).

Each case is a real ``python -m vlmjax.main`` subprocess that fails before any compiling. They start
together, as many at a time as there are CPU cores (each is mostly the ~5 s import of jax), so the
whole table takes about a minute on 2 cores; running a subset (``-k``) starts only those.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from ml_collections import config_dict

from conftest import run_module

from vlmjax import errors
from vlmjax import main as main_lib

SMOKE = "--config=configs/lm.py:smoke"
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
# Cases that fail after the data is built use a small text corpus: the embedded one takes ~6 s.
SMALL_DATA = ["--config.data.source=text", "--config.data.path={t}/docs/*.txt"]

# id -> (arguments after `python -m vlmjax.main`, extra environment, texts the error line must hold).
# {t}: a per-test folder holding empty.txt, short.txt, broken.py (a syntax error), afile (a file),
# emptydir/ and docs/ (100 small text files); {w}: a fresh workdir.
CASES = {
    "field_typo": ([SMOKE, "--workdir={w}", "--config.totl_steps=5"], None,
                   ["config.totl_steps: no such field (did you mean 'total_steps'?)"]),
    "nested_field_typo": ([SMOKE, "--workdir={w}", "--config.optim.lrr=1"], None,
                          ["config.optim.lrr: no such field (did you mean 'lr'?)"]),
    "section_typo": ([SMOKE, "--workdir={w}", "--config.optimm.lr=1"], None,
                     ["config.optimm: no such field (did you mean 'optim'?)"]),
    "wrong_type": ([SMOKE, "--workdir={w}", "--config.total_steps=abc"], None,
                   ["config.total_steps=abc: expected an int, e.g. --config.total_steps=6"]),
    "missing_config_file": (["--config=configs/nope.py", "--workdir={w}"], None,
                            ["--config=configs/nope.py: no experiment file", "configs/nope.py",
                             "the experiments are configs/dtf.py, ", "configs/lm.py, "]),
    "config_file_syntax_error": (["--config={t}/broken.py", "--workdir={w}"], None,
                                 ["--config={t}/broken.py: the experiment file does not load: {t}/broken.py "
                                  "line 1"]),
    "bad_variant": (["--config=configs/lm.py:smok", "--workdir={w}"], None,
                    ["configs/lm.py:smok is not a variant", "(did you mean 'smoke'?)"]),
    "no_config": (["--workdir={w}"], None, ["--config is required", "configs/lm.py"]),
    "no_workdir": ([SMOKE], None, ["--workdir is required", "--workdir=/tmp/run"]),
    "unknown_flag": ([SMOKE, "--workdir={w}", "--foo=1"], None, ["'foo'", "--help lists the flags"]),
    "positional_argument": ([SMOKE, "--workdir={w}", "extra"], None,
                            ["unexpected argument(s) ['extra']", "--name=value"]),
    "negative_steps": ([SMOKE, "--workdir={w}", "--config.total_steps=-1"], None,
                       ["config.total_steps=-1", "positive"]),
    "bad_schedule": ([SMOKE, "--workdir={w}", *SMALL_DATA, "--config.optim.schedule=foo"], None,
                     ["config.optim.schedule='foo'", "'cosine'"]),
    "batch_vs_mesh": ([SMOKE, "--workdir={w}", *SMALL_DATA, "--config.batch_size=7"], TWO_DEVICES,
                      ["config.batch_size=7", "multiple of 2"]),
    "data_path_missing": ([SMOKE, "--workdir={w}", "--config.data.source=text",
                           "--config.data.path={t}/nope/*.txt"], None,
                          ["config.data.path='{t}/nope/*.txt' matched no files", "point it"]),
    "empty_text_file": ([SMOKE, "--workdir={w}", "--config.data.source=text",
                         "--config.data.path={t}/empty.txt"], None,
                        ["{t}/empty.txt is empty", "264 tokens", "Point config.data.path"]),
    "too_few_documents": ([SMOKE, "--workdir={w}", "--config.data.source=text",
                           "--config.data.path={t}/short.txt"], None,
                          ["{t}/short.txt", "evaluation split is empty", "give about 60 or more",
                           "264 tokens"]),
    "tokenizer_dir_missing": ([SMOKE, "--workdir={w}", "--config.data.tokenizer=hf",
                               "--config.data.tokenizer_path={t}/nope"], None,
                              ["config.data.tokenizer_path='{t}/nope': no such directory", "tokenizer.json"]),
    "init_from_missing": ([SMOKE, "--workdir={w}", "--config.init_from={t}/nope",
                           "--config.data.tokenizer=hf"], None,
                          ["config.init_from='{t}/nope': no such directory", "Hugging Face"]),
    "init_from_not_hf": ([SMOKE, "--workdir={w}", "--config.init_from={t}/emptydir"], None,
                         ["config.init_from='{t}/emptydir' is not a Hugging Face checkpoint directory",
                          "config.json"]),
    "workdir_is_a_file": ([SMOKE, "--workdir={t}/afile"], None,
                          ["--workdir={t}/afile is a file, not a directory", "pass a directory"]),
    "verbose": ([SMOKE, "--workdir={w}", "--config.totl_steps=5", "--verbose"], None,
                ["config.totl_steps: no such field (did you mean 'total_steps'?)"]),
}


def _run_case(name: str, base: str):
    args, env, _ = CASES[name]
    t = os.path.join(base, name)
    os.makedirs(os.path.join(t, "emptydir"))
    open(os.path.join(t, "empty.txt"), "w").close()
    open(os.path.join(t, "afile"), "w").close()
    with open(os.path.join(t, "broken.py"), "w") as f:
        f.write("def get_config(:\n")
    with open(os.path.join(t, "short.txt"), "w") as f:
        f.write("One short document.\n")
    os.makedirs(os.path.join(t, "docs"))
    for i in range(100):
        with open(os.path.join(t, "docs", f"{i}.txt"), "w") as f:
            f.write(f"Document {i}: a few words of text to train on. " * 4)
    argv = [a.format(t=t, w=os.path.join(t, "workdir")) for a in args]
    return run_module(["-m", "vlmjax.main", *argv], env_extra=env, timeout=300)


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """The selected cases' CompletedProcess, run concurrently once for the module."""
    selected = sorted({item.callspec.params["case"] for item in request.session.items
                       if item.module is request.module and hasattr(item, "callspec")
                       and "case" in item.callspec.params})
    base = str(tmp_path_factory.mktemp("errors"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(_run_case, name, base) for name in selected}
        return {name: f.result() for name, f in futures.items()}, base


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, results):
    runs, base = results
    p = runs[case]
    t = os.path.join(base, case)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1, p.stderr[-3000:]
    assert lines, p.stdout[-2000:]
    last = lines[-1]
    assert last.startswith("vlmjax: error: "), p.stderr[-3000:]
    for text in CASES[case][2]:
        assert text.format(t=t) in last, last
    assert "this looks like a bug" not in last
    if case == "verbose":
        assert "Traceback" in p.stderr and "KeyError: 'totl_steps'" in p.stderr
    else:
        assert "Traceback" not in p.stderr, p.stderr[-3000:]


# ---- in process: the top-level handler and format_error -----------------------------------------

def _cli_raising(monkeypatch, exc: BaseException, argv=("vlmjax",)):
    def run(*args, **kwargs):
        raise exc
    monkeypatch.setattr(main_lib.app, "run", run)
    with pytest.raises(SystemExit) as e:
        main_lib.cli(list(argv))
    return e.value.code


def test_ctrl_c_exits_130(monkeypatch, capsys):
    monkeypatch.delenv("VLMJAX_VERBOSE", raising=False)
    assert _cli_raising(monkeypatch, KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "vlmjax: error: interrupted (Ctrl-C)"
    assert "Traceback" not in err


def test_a_bug_says_so_and_the_env_var_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.delenv("VLMJAX_VERBOSE", raising=False)
    assert _cli_raising(monkeypatch, TypeError("unsupported operand")) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "vlmjax: error: TypeError: unsupported operand (this looks like a bug in vlmjax: rerun with "
        "--verbose and report the traceback)"]
    monkeypatch.setenv("VLMJAX_VERBOSE", "1")
    assert _cli_raising(monkeypatch, ValueError("config.x=1 must be 2.")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "vlmjax: error: config.x=1 must be 2."


def test_system_exit_with_a_message_is_one_line_and_codes_pass_through(monkeypatch, capsys):
    monkeypatch.delenv("VLMJAX_VERBOSE", raising=False)
    assert _cli_raising(monkeypatch, SystemExit("Stage 'a' stopped; run the same command again.")) == 1
    assert capsys.readouterr().err.strip() == "vlmjax: error: Stage 'a' stopped; run the same command again."
    assert _cli_raising(monkeypatch, SystemExit(3)) == 3
    assert capsys.readouterr().err == ""


def test_format_error():
    c = config_dict.ConfigDict({"total_steps": 1})
    c.lock()
    with pytest.raises(AttributeError) as e:
        _ = c.totl_steps
    assert errors.missing_field(e.value) == ("totl_steps", "total_steps")
    assert errors.format_error(e.value) == ("vlmjax: error: config field 'totl_steps' does not exist "
                                            "(did you mean 'total_steps'?)")
    assert errors.format_error(errors.UserError("config.a=1: give\n  a b")) == (
        "vlmjax: error: config.a=1: give a b")
    assert errors.format_error(KeyError("no 'x' here")) == "vlmjax: error: no 'x' here"
    assert errors.format_error(KeyError("x")) == "vlmjax: error: KeyError: 'x'"
    assert errors.format_error(PermissionError(13, "Permission denied", "/ckpt")) == (
        "vlmjax: error: /ckpt: Permission denied")
    assert errors.format_error(RuntimeError("vlmjax: workdir /w is in use")).startswith(
        "vlmjax: error: RuntimeError: workdir /w is in use (this looks like a bug")
