"""User plugins: `--plugin PATH_OR_MODULE` imports a Python file or module that registers methods (or datasets)
before anything is checked, so a researcher's own method runs under the same protocol without forking.

A file plugin is imported as a module named after the file (`examples/my_method.py` -> `my_method`). The modules
loaded here are what Ray ships to every worker (the job's `runtime_env["py_modules"]`, `uhkd.sweep.cluster`) and
what each trial or Ray Train worker imports again by name (`import_modules`) before it builds its run.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from .errors import UserError, one_line

_loaded: dict[str, ModuleType] = {}  # module name -> module, in load order
_files: dict[str, str] = {}  # module name -> the file a file plugin was loaded from


def add_plugin_flag(parser: Any) -> None:
    """`--plugin PATH_OR_MODULE` (repeatable) on a parser or argument group."""
    parser.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                        help="a Python file or module that registers your own methods (repeatable); imported before "
                             "anything is checked and shipped to every Ray worker")


def _from_file(path: Path) -> ModuleType:
    name = path.stem
    if not name.isidentifier():
        raise UserError(f"plugin {str(path)!r}: its file name must be a Python module name (letters, digits, _)")
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == path.resolve():
            return existing
        raise UserError(f"plugin {str(path)!r} would be imported as module {name!r}, which is taken by "
                        f"{getattr(existing, '__file__', None) or 'a built-in module'}; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load(specs: Iterable[str]) -> list[str]:
    """Import each plugin (a `.py` file or an importable module name); returns the module names. A plugin that
    fails to import, or registers a name that exists, is one `UserError` line."""
    names = []
    for spec in specs:
        path = Path(spec).expanduser()
        is_file = spec.endswith(".py") or "/" in spec
        if is_file and not path.is_file():
            raise UserError(f"plugin {spec!r} not found (give a .py file or an importable module name)")
        try:
            module = _from_file(path) if is_file else importlib.import_module(spec)
        except UserError as err:
            raise UserError(f"plugin {spec!r}: {err}") from None
        except Exception as exc:  # noqa: BLE001 — whatever the plugin raises becomes one line
            kind = "not found" if isinstance(exc, ModuleNotFoundError) and exc.name == spec else "failed to import"
            raise UserError(f"plugin {spec!r} {kind}: {type(exc).__name__}: {one_line(exc, 200)}") from None
        _loaded[module.__name__] = module
        if is_file:
            _files[module.__name__] = str(path.resolve())
        names.append(module.__name__)
    return names


def loaded() -> list[str]:
    """The plugins loaded in this process, as `import_modules` takes them: `name=file` for a file plugin (a worker on
    this machine can load it from there when Ray did not ship it), the module name otherwise."""
    return [f"{name}={_files[name]}" if name in _files else name for name in _loaded]


def modules() -> list[ModuleType]:
    """The plugin modules loaded in this process (what Ray ships to the workers)."""
    return list(_loaded.values())


def import_modules(specs: Iterable[str]) -> None:
    """In a Ray worker: import the plugins the driver loaded (`loaded()`), by module name where Ray's `py_modules`
    put them on the worker's path, else from the driver's file (a cluster that shares this machine's disk)."""
    for spec in specs:
        name, _, path = spec.partition("=")
        if name in _loaded:
            continue
        try:
            _loaded[name] = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name or not path or not Path(path).is_file():
                raise
            _loaded[name] = _from_file(Path(path))
