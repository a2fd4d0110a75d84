"""Text document sources: the embedded CPython corpus, local files and TFDS.

Every source returns documents as a random-access sequence of `str` (`len()` and
integer indexing), which is exactly what `grain.MapDataset.source` needs. The
embedded corpus and local files are read into memory; TFDS `data_source`
directories stay on disk (ArrayRecord, random access) and are decoded lazily
(`vlmjax.data.tfds_text`).

The embedded corpus is real English prose that ships with every CPython, so
experiments and tests run offline with nothing but the installed interpreter:

* `pydoc_data.topics.topics`: the text of the language reference that `help()`
  shows (one document per topic);
* `LICENSE.txt` and `email/architecture.rst` from the standard library folder;
* docstrings (module, class, function and method) of a fixed, sorted list of
  pure-Python standard-library modules, read with `ast` from their source files
  so that nothing is imported or executed;
* docstrings of a fixed list of C extension modules (`math`, `itertools`, ...),
  which have no Python source and are read from `__doc__` after importing.

Docstrings shorter than `MIN_DOCSTRING_CHARS` ("Return self+value.") are
dropped and exact duplicates are removed, keeping the first occurrence. With the
same Python build the corpus is byte-identical on every machine; its
`corpus_fingerprint` is logged by the LM pipeline so runs can be compared.

Train/validation splits of in-memory documents are made by a hash of each
document's text (`zlib.crc32`), so the split does not depend on document order,
on the number of documents, or on the process that computes it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import functools
import glob
import gzip
import importlib
import inspect
import json
import os
import sysconfig
import tokenize
import zlib

from absl import logging

from vlmjax.data import tfds_text
# Moved to `tfds_text` (TFDS text, read and write, in one module); re-exported for old callers.
from vlmjax.data.tfds_text import tfds_documents  # noqa: F401  pylint: disable=unused-import
from vlmjax.data.tfds_text import TfdsTextSource  # noqa: F401  pylint: disable=unused-import

SOURCES = ("embedded", "text", "jsonl", "tfds")

# Docstrings shorter than this are one-line stubs ("Return self+value.") that
# repeat hundreds of times with small variations and carry no prose.
MIN_DOCSTRING_CHARS = 64

# Pure-Python standard-library modules and packages whose docstrings enter the
# corpus, in the fixed order in which they are read. Left out on purpose:
#  * modules deprecated by PEP 594 or removed in later Pythons (aifc, cgi, imp,
#    distutils, lib2to3, ...), so that the list means the same on 3.11 - 3.13;
#  * parts that Linux distributions ship as separate packages (idlelib,
#    tkinter, turtle, turtledemo, ensurepip, test), so that a distro Python
#    and a python.org/pyenv build of the same version give the same corpus;
#  * easter eggs with side effects (antigravity, this, __hello__) and codec
#    tables (encodings), which are not prose.
# A package contributes all of its `.py` files in sorted path order, minus
# `test`/`tests` folders. A module whose source file is missing is skipped.
STDLIB_MODULES = (
    "__future__", "_collections_abc", "_compression", "_markupbase",
    "_pydecimal", "_pyio", "_strptime", "_threading_local", "_weakrefset",
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "bz2",
    "calendar", "cmd", "code", "codecs", "codeop", "collections", "colorsys",
    "compileall", "concurrent", "configparser", "contextlib", "contextvars",
    "copy", "copyreg", "csv", "ctypes", "curses", "dataclasses", "datetime",
    "dbm", "decimal", "difflib", "dis", "doctest", "email", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "genericpath",
    "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "io",
    "ipaddress", "json", "keyword", "linecache", "locale", "logging", "lzma",
    "mailbox", "mimetypes", "modulefinder", "multiprocessing", "netrc",
    "ntpath", "numbers", "opcode", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "profile", "pstats", "pty", "py_compile",
    "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib",
    "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "stat", "statistics", "string", "stringprep", "struct",
    "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "tomllib",
    "trace", "traceback", "tracemalloc", "tty", "types", "typing", "unittest",
    "urllib", "uuid", "venv", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zoneinfo",
)

# C modules (builtin or lib-dynload) whose `__doc__` strings enter the corpus.
# Importing them has no side effects. `_ssl`/`_hashlib` are left out because
# their docs depend on the OpenSSL build, `readline`/`_curses` because they
# touch the terminal.
C_MODULES = (
    "_abc", "_asyncio", "_bisect", "_bz2", "_codecs", "_collections",
    "_contextvars", "_csv", "_datetime", "_decimal", "_elementtree",
    "_functools", "_heapq", "_io", "_json", "_locale", "_lzma", "_operator",
    "_pickle", "_queue", "_random", "_socket", "_sqlite3", "_sre",
    "_statistics", "_string", "_struct", "_thread", "_tracemalloc",
    "_warnings", "_weakref", "_zoneinfo", "array", "atexit", "binascii",
    "builtins", "cmath", "errno", "faulthandler", "gc", "itertools",
    "marshal", "math", "mmap", "posix", "pyexpat", "select", "sys", "time",
    "unicodedata", "zlib",
)

# Prose files that live in the standard-library folder itself.
STDLIB_TEXT_FILES = ("LICENSE.txt", os.path.join("email", "architecture.rst"))

_SKIPPED_PACKAGE_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})


# ----------------------------------------------------------------------------
# Embedded corpus.
# ----------------------------------------------------------------------------


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _module_source_files(stdlib: str, name: str) -> list[str]:
    """Source files of one stdlib module or package, in sorted path order."""
    package_dir = os.path.join(stdlib, name)
    if os.path.isdir(package_dir):
        files = []
        for root, dirs, names in os.walk(package_dir):
            # Sorting in place makes os.walk itself visit folders in sorted order.
            dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_PACKAGE_DIRS)
            files.extend(os.path.join(root, n) for n in sorted(names)
                         if n.endswith(".py"))
        return files
    module_file = package_dir + ".py"
    return [module_file] if os.path.isfile(module_file) else []


def _docstrings_from_source(path: str) -> Iterator[str]:
    """Module/class/function docstrings of a Python file, in `ast.walk` order."""
    # tokenize.open honours PEP 263 encoding cookies.
    with tokenize.open(path) as f:
        source = f.read()
    tree = ast.parse(source, filename=path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _docstrings_from_c_module(name: str) -> Iterator[str]:
    """`__doc__` of a C module, its classes and routines, and class members."""
    module = importlib.import_module(name)
    objects = [module]
    namespace = vars(module)
    for attr in sorted(namespace):
        obj = namespace[attr]
        if inspect.isclass(obj) or inspect.isroutine(obj):
            objects.append(obj)
        if inspect.isclass(obj):
            members = vars(obj)
            objects.extend(members[m] for m in sorted(members))
    for obj in objects:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            yield inspect.cleandoc(doc)


def _embedded_candidates() -> Iterator[str]:
    """All candidate documents of the embedded corpus, in their fixed order."""
    # pydoc_data is generated from the CPython docs at release time; topics is a
    # plain dict of str, imported lazily because it is ~0.5 MB of source.
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top

    for key in sorted(topics.topics):
        yield topics.topics[key]

    stdlib = _stdlib_dir()
    for relpath in STDLIB_TEXT_FILES:
        path = os.path.join(stdlib, relpath)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                yield f.read()

    for name in STDLIB_MODULES:
        for path in _module_source_files(stdlib, name):
            try:
                yield from _docstrings_from_source(path)
            except (SyntaxError, UnicodeDecodeError) as e:
                # A source newer/older than this interpreter's grammar: skip the file
                # (the corpus stays deterministic for a given Python build).
                logging.warning("embedded corpus: skipping %s (%s)", path, e)

    for name in C_MODULES:
        try:
            yield from _docstrings_from_c_module(name)
        except ImportError:
            logging.info("embedded corpus: C module %s not available", name)


@functools.lru_cache(maxsize=1)
def _embedded_corpus_cached() -> tuple[str, ...]:
    seen = set()
    documents = []
    for doc in _embedded_candidates():
        doc = doc.strip()
        if len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
            continue
        seen.add(doc)
        documents.append(doc)
    return tuple(documents)


def embedded_corpus() -> list[str]:
    """Returns the embedded English corpus (see module docstring), ~2 MB.

    The result is computed once per process (about 2 s, mostly `ast.parse`) and
    cached; a fresh list is returned on every call.
    """
    return list(_embedded_corpus_cached())


def corpus_fingerprint(documents: Iterable[str]) -> str:
    """Order-sensitive CRC32 of a list of documents, as 8 hex digits."""
    crc = 0
    for doc in documents:
        crc = zlib.crc32(doc.encode("utf-8"), crc)
        crc = zlib.crc32(b"\x00", crc)  # Document boundary.
    return f"{crc:08x}"


def split_by_hash(
    documents: Iterable[str], val_fraction: float
) -> tuple[list[str], list[str]]:
    """Splits documents into (train, validation) by a hash of their text.

    A document goes to validation iff `crc32(utf8(text)) < val_fraction * 2**32`.
    The assignment of a document never depends on the other documents or on
    their order, so adding files to a corpus never moves existing documents
    across the split, and every process computes the same split.

    Args:
      documents: the documents.
      val_fraction: expected fraction of documents in validation, in [0, 1).

    Returns:
      (train, validation) lists, each in the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"config.data.val_fraction={val_fraction!r} must be in [0, 1).")
    threshold = int(val_fraction * 2**32)
    train, val = [], []
    for doc in documents:
        (val if zlib.crc32(doc.encode("utf-8")) < threshold else train).append(doc)
    return train, val


# ----------------------------------------------------------------------------
# Local files.
# ----------------------------------------------------------------------------


def glob_files(pattern: str, source: str) -> list[str]:
    """Sorted regular files matching `pattern` (`**` recurses)."""
    if not pattern:
        raise ValueError(
            f"config.data.path is empty; source={source!r} needs a glob of local "
            "files, e.g. '/data/books/**/*.txt'.")
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern),
                                        recursive=True) if os.path.isfile(p))
    if not files:
        raise ValueError(
            f"config.data.path={pattern!r} matched no files (source={source!r}); point it "
            f"at existing local files, a path or a glob (relative to {os.getcwd()}).")
    return files


def _open_text(path: str):
    """Opens a UTF-8 text file, transparently gunzipping `*.gz`."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def text_file_documents(pattern: str) -> list[str]:
    """One document per file matched by `pattern`, in sorted path order.

    Whole files are documents (not paragraphs) so that long-range structure
    (books, articles, source files) survives packing. Empty files are skipped.
    """
    documents = []
    for path in glob_files(pattern, "text"):
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} (matched by config.data.path={pattern!r}) is not UTF-8 "
                f"text ({e}); narrow the glob to text files.") from e
        if text.strip():
            documents.append(text)
    return documents


def jsonl_documents(pattern: str, text_field: str) -> list[str]:
    """One document per JSON line, `line[text_field]`, files in sorted order.

    Blank lines are skipped; `*.jsonl.gz` files are read compressed.
    """
    documents = []
    for path in glob_files(pattern, "jsonl"):
        with _open_text(path) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record)
                    raise ValueError(
                        f"{path}:{line_number} has no field "
                        f"config.data.text_field={text_field!r} (found {keys}).")
                text = record[text_field]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{line_number}: field {text_field!r} is "
                        f"{type(text).__name__}, expected a string.")
                if text.strip():
                    documents.append(text)
    return documents


# ----------------------------------------------------------------------------
# Dispatch from the data config.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Documents:
    """Train and validation documents of one configured source.

    Attributes:
      train: random-access documents of the training split.
      validation: random-access documents of the evaluation split.
      description: human-readable origin, for logs and benchmark tables.
    """

    train: Sequence[str]
    validation: Sequence[str]
    description: str


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(
            f"config.data.source={source!r} is not one of "
            f"{', '.join(repr(s) for s in SOURCES)}")


def load_documents(data_cfg) -> Documents:
    """Builds the train/validation documents that `data_cfg.source` names.

    Args:
      data_cfg: the data section of an experiment config (see
        `vlmjax.data.lm.default_config`); reads `source`, `path`, `tfds_name`,
        `train_split`, `eval_split`, `text_field` and `val_fraction`.

    Returns:
      Documents. `embedded`, `text` and `jsonl` are split by `split_by_hash`
      with `val_fraction`; `tfds` uses the named `train_split`/`eval_split`.
    """
    source = data_cfg.source
    check_source(source)
    if source == "tfds":
        train = tfds_text.tfds_documents(name=data_cfg.tfds_name, data_dir=data_cfg.path,
                                         split=data_cfg.train_split,
                                         text_field=data_cfg.text_field,
                                         split_field="train_split")
        validation = tfds_text.tfds_documents(name=data_cfg.tfds_name, data_dir=data_cfg.path,
                                              split=data_cfg.eval_split,
                                              text_field=data_cfg.text_field,
                                              split_field="eval_split")
        return Documents(train, validation, repr(train))

    if source == "embedded":
        documents = embedded_corpus()
        description = (f"embedded CPython corpus ({len(documents)} documents, "
                       f"fingerprint {corpus_fingerprint(documents)})")
    elif source == "text":
        documents = text_file_documents(data_cfg.path)
        description = f"text files {data_cfg.path!r} ({len(documents)} documents)"
    else:
        documents = jsonl_documents(data_cfg.path, data_cfg.text_field)
        description = f"JSONL {data_cfg.path!r} ({len(documents)} documents)"
    train, validation = split_by_hash(documents, data_cfg.val_fraction)
    return Documents(train, validation, description)
