"""The import rules README states ("How the code is organized"), checked on the source with ``ast``:

- ``layouts`` (the contract) imports nothing of the project;
- ``convert`` and ``runtime`` never import each other; ``metal`` imports neither;
- the shared modules of the ``flashmoe`` folder (``cli``, ``fileio``, ``verify``, ``hubio``...)
  import only ``layouts``;
- nothing in the product imports the benchmarks: the unpackaged ``benchmarks/`` never, and
  ``flashmoe.bench`` (the ``flashmoe-bench`` command) only itself.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package (pyproject.toml's [tool.setuptools.package-dir])
PACKAGES = {
    "flashmoe": "flashmoe",
    "convert": "flashmoe.convert",
    "runtime": "flashmoe.runtime",
    "metal": "flashmoe.metal",
    "layouts": "flashmoe.layouts",
    "bench": "flashmoe.bench",
}
SUBPACKAGES = [p for p in PACKAGES.values() if p != "flashmoe"]

# package -> what it may not import (by prefix); layouts: anything of flashmoe but itself
FORBIDDEN = {
    "flashmoe.convert": ["flashmoe.runtime", "flashmoe.bench"],
    "flashmoe.runtime": ["flashmoe.convert", "flashmoe.bench"],
    "flashmoe.metal": ["flashmoe.convert", "flashmoe.runtime", "flashmoe.bench"],
    # flashmoe/__main__.py dispatches through entry points, not imports
    "flashmoe": [p for p in SUBPACKAGES if p != "flashmoe.layouts"],
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path) -> tuple[str, str]:
    """(module, its package) of a product source file."""
    package = PACKAGES[path.relative_to(ROOT).parts[0]]
    return (package if path.name == "__init__.py" else f"{package}.{path.stem}"), package


def imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``source`` (functions included)
    of a module in ``package``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            if node.module is None:  # from . import x: x is a module
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, f"{base}.{node.module}" if base else node.module))
    return out


def violations(path: Path, source: str) -> list[str]:
    _, package = module_name(path)
    where = path.relative_to(ROOT)
    found = []
    for line, name in imports(source, package):
        if _within(name, "benchmarks"):
            found.append(f"{where}:{line}: imports {name} (the unpackaged benchmarks)")
        elif package == "flashmoe.layouts":
            if _within(name, "flashmoe") and not _within(name, package):
                found.append(f"{where}:{line}: layouts imports {name}")
        elif any(_within(name, prefix) for prefix in FORBIDDEN.get(package, [])):
            found.append(f"{where}:{line}: {package} imports {name}")
    return found


def product_files() -> list[Path]:
    return sorted(f for folder in PACKAGES for f in (ROOT / folder).rglob("*.py"))


def test_the_product_follows_the_import_rules():
    files = product_files()
    assert len(files) > 40
    found = [v for f in files for v in violations(f, f.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "path, source",
    [
        ("layouts/x.py", "from ..metal import bank"),
        ("layouts/x.py", "import flashmoe.cli"),
        ("convert/x.py", "from ..runtime.loader import load"),
        ("runtime/x.py", "def f():\n    from flashmoe.convert import convert_checkpoint"),
        ("runtime/x.py", "from .. import bench"),
        ("metal/x.py", "from ..runtime import sizing"),
        ("flashmoe/x.py", "from .runtime import load"),
        ("bench/x.py", "import benchmarks.io_bench"),
    ],
)
def test_the_checker_sees_a_violation(path, source):
    assert violations(ROOT / path, source)


@pytest.mark.parametrize(
    "path, source",
    [
        ("layouts/x.py", "from .index import Index\nfrom . import plan\nimport json"),
        ("runtime/x.py", "from ..layouts import Index\nfrom ..metal.bank import ExpertBank"),
        ("convert/x.py", "from ..fileio import commit\nfrom flashmoe import __version__"),
        ("bench/x.py", "from ..runtime import load\nfrom ..convert import convert_checkpoint"),
        ("flashmoe/x.py", "from .layouts import Index\nfrom .cli import command"),
    ],
)
def test_the_checker_allows(path, source):
    assert not violations(ROOT / path, source)


def _top_level_names(path: str) -> set[str]:
    names = set()
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_benchmarks_import_what_exists():
    """benchmarks/ is not packaged and has no tests of its own: its imports of flashmoe must
    still resolve after code moves (checked on the source, without importing MLX)."""
    missing = []
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flashmoe")
            ):
                continue
            spec = importlib.util.find_spec(node.module)
            defined = _top_level_names(spec.origin) if spec else set()
            for a in node.names:
                submodule = spec and spec.submodule_search_locations is not None
                if a.name in defined or (submodule and _exists(f"{node.module}.{a.name}")):
                    continue
                missing.append(f"{script.name}:{node.lineno}: {node.module}.{a.name}")
    assert not missing, "\n".join(missing)
