"""Write a small English JSONL corpus from the docstrings of Python's standard library; no downloads.

    python examples/make_tiny_corpus.py --output data/corpus.jsonl

Each line is {"text": docstring} for a module, class, function or method, cleaned, deduplicated, in
a fixed order (sorted module names, then sorted member names), so the same Python gives the same file.
"""

import argparse
import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Iterator

# Modules (and their submodules) whose import opens windows or browsers, prints, touches the
# terminal or the file system, or is platform-specific or deprecated.
SKIPPED_MODULES = {
    "antigravity", "this", "tkinter", "idlelib", "turtle", "turtledemo", "webbrowser", "readline",
    "rlcompleter", "curses", "lib2to3", "distutils", "ensurepip", "venv", "pydoc_data", "msilib",
    "msvcrt", "winreg", "winsound", "nt", "ntpath", "nturl2path", "crypt", "nis", "spwd", "ossaudiodev",
}
MIN_DOC_CHARS = 80


def stdlib_module_names() -> list[str]:
    """Public top-level standard-library modules and the public submodules of its packages."""
    names = set()
    for name in sys.stdlib_module_names:
        if name.startswith("_") or name in SKIPPED_MODULES:
            continue
        names.add(name)
        package_path = getattr(import_quietly(name), "__path__", None)
        if package_path is None:
            continue
        with quiet():
            try:  # walk_packages imports subpackages to list their contents
                infos = list(pkgutil.walk_packages(package_path, prefix=f"{name}.", onerror=lambda _: None))
            except BaseException:
                infos = []
        names.update(info.name for info in infos if not any(part.startswith("_") for part in info.name.split(".")))
    return sorted(names)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Nothing printed or warned during module imports gets out."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def import_quietly(name: str):
    """The module, or None when importing it fails."""
    with quiet():
        try:
            return importlib.import_module(name)
        except BaseException:  # ImportError, SystemExit, platform errors: skip the module
            return None


def module_docstrings(module) -> Iterator[str]:
    """The module's docstring, then those of the classes/functions it defines and their methods."""
    yield inspect.getdoc(module) or ""
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        yield inspect.getdoc(member) or ""
        if inspect.isclass(member):
            for method_name, method in sorted(vars(member).items()):
                if not method_name.startswith("_") and inspect.isroutine(method):
                    yield inspect.getdoc(method) or ""


def collect_documents(max_bytes: int) -> list[str]:
    documents, seen, total_bytes = [], set(), 0
    for name in stdlib_module_names():
        module = import_quietly(name)
        if module is None:
            continue
        for text in module_docstrings(module):
            text = text.strip()
            if len(text) < MIN_DOC_CHARS or text in seen:
                continue
            size = len(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8")) + 1
            if total_bytes + size > max_bytes:
                return documents
            seen.add(text)
            documents.append(text)
            total_bytes += size
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="data/corpus.jsonl")
    parser.add_argument("--max-mb", type=float, default=4.0, help="stop once the file would exceed this size")
    args = parser.parse_args()

    documents = collect_documents(int(args.max_mb * 1e6))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as sink:
        for text in documents:
            sink.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {output}: {len(documents)} documents, {output.stat().st_size} bytes")


if __name__ == "__main__":
    main()
