"""The package's imports flow one way (docs/ARCHITECTURE.md):
data -> backbones -> embed -> methods -> metrics -> index -> pipeline -> training -> cli / serve.

Every ``from fewshot...`` / relative import in src/fewshot is resolved to its top-level part and
checked against that order: a module may import its own part, a part to its left, or one of the
shared helpers (``errors``, ``io``, ``viz``, the package ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fewshot"
LAYERS = ["data", "backbones", "embed", "methods", "metrics", "index", "pipeline", "training", "cli", "serve"]
SHARED = {"errors", "io", "viz", "__init__"}


def _part(module: str) -> str:
    """``fewshot.methods.base`` -> ``methods``; ``fewshot`` -> ``__init__``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of fewshot in ``path``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    here = list(rel.parts if rel.name != "__init__" else rel.parts[:-1])
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # "from . import x": x is a module of that package, or a name in it
                    folder = PACKAGE.parent.joinpath(*base)
                    for alias in node.names:
                        is_module = (folder / f"{alias.name}.py").is_file() or (folder / alias.name).is_dir()
                        found.append((node.lineno, f"{module}.{alias.name}" if is_module else module))
                    continue
            else:
                module = node.module or ""
            if module.split(".")[0] == "fewshot":
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fewshot"]
    return found


def _rank(part: str) -> int | None:
    if part in LAYERS:
        return LAYERS.index(part) if part not in ("cli", "serve") else len(LAYERS)
    return None


def test_imports_flow_one_way():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own in SHARED or _rank(own) is None:
            continue
        for line, module in _imports(path):
            target = _part(module)
            if target in SHARED or target == own:
                continue
            rank = _rank(target)
            assert rank is not None, f"{path}:{line} imports unknown part {module}"
            if rank > _rank(own):
                bad.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {module} ({target})")
    assert not bad, "imports against the one-way order:\n" + "\n".join(bad)


def test_the_check_sees_relative_imports():
    """The resolver must map relative imports to the right part, or the test above proves nothing."""
    mods = dict((m, n) for n, m in _imports(PACKAGE / "training.py"))
    assert "fewshot.pipeline" in mods and "fewshot.methods.base" in mods
    mods = [m for _, m in _imports(PACKAGE / "methods" / "maml.py")]
    assert any(m.startswith("fewshot.methods.") for m in mods)
