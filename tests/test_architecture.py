"""The package's imports flow one way (docs/ARCHITECTURE.md):
data -> backbones -> embed -> model -> methods -> metrics -> index -> catalogue -> evaluation -> training -> api
-> cli / serve.

Every ``from fewshot...`` / relative import in src/fewshot is resolved to its top-level part and
checked against that order: a module may import its own part, a part to its left, or one of the
shared helpers (``errors``, ``io``, ``registry``, ``viz``, the package ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fewshot"
LAYERS = ["data", "backbones", "embed", "model", "methods", "metrics", "index", "catalogue", "evaluation",
          "training", "api", "cli", "serve"]
SHARED = {"checks", "errors", "io", "options", "registry", "version", "viz", "__init__"}


def _part(module: str) -> str:
    """``fewshot.model`` -> ``methods``; ``fewshot`` -> ``__init__``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def _imports(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in ``path`` (module level and
    inside functions alike); ``from P import x`` where ``x`` is a module of package ``P``
    counts as an import of ``P.x``."""
    root = package_dir.parent
    top = package_dir.name
    rel = path.relative_to(root).with_suffix("")
    here = list(rel.parts if rel.name != "__init__" else rel.parts[:-1])
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != top:
                continue
            folder = root.joinpath(*module.split("."))
            for alias in node.names:  # a module of that package, or a name in it
                is_module = (folder / f"{alias.name}.py").is_file() or (folder / alias.name).is_dir()
                found.append((node.lineno, f"{module}.{alias.name}" if is_module else module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == top]
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
    mods = dict((m, n) for n, m in _imports(PACKAGE / "training" / "loop.py"))
    assert "fewshot.evaluation" in mods and "fewshot.model" in mods
    mods = [m for _, m in _imports(PACKAGE / "methods" / "maml.py")]
    assert any(m.startswith("fewshot.methods.") for m in mods)


# --------------------------------------------------------------------------- cycles, function length
def _module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles(package_dir: Path) -> list[list[str]]:
    """Strongly connected groups (size > 1, or a module importing itself) of the package's
    import graph, module-level and function-level imports alike (Tarjan's algorithm)."""
    modules = {_module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # "pkg.mod.Name" -> "pkg.mod"
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: sorted({t for _, imp in _imports(p, package_dir) if (t := resolve(imp)) and t != m})
             for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in graph:
        if m not in index:
            visit(m)
    return cycles


def long_functions(package_dir: Path, limit: int = 80) -> list[str]:
    """``path:line name length`` of every function whose body, docstring excluded, is longer
    than ``limit`` lines."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    body = body[1:]
                if not body:
                    continue
                length = body[-1].end_lineno - body[0].lineno + 1
                if length > limit:
                    out.append(f"{path.relative_to(package_dir)}:{node.lineno} {node.name} {length}")
    return out


def test_no_import_cycles():
    assert import_cycles(PACKAGE) == []


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "toypkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n    return thing\n")  # function level
    (pkg / "c.py").write_text("from . import a\n")
    assert import_cycles(pkg) == [["toypkg.a", "toypkg.sub.b"]]


def test_no_function_over_80_lines():
    assert long_functions(PACKAGE) == []


def test_the_length_check_measures_bodies(tmp_path):
    pkg = tmp_path / "toypkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (pkg / "m.py").write_text(f'def long():\n    """doc\n\n    more doc\n    """\n{body}\n\n\ndef short():\n    return 1\n')
    assert long_functions(pkg) == ["m.py:1 long 81"]


# --------------------------------------------------------------------------- index kinds
#: what holds an index kind's name: a name or attribute called so
KIND_NAMES = {"kind", "index_type", "kind_name"}


def _holds_kind(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in KIND_NAMES) or \
        (isinstance(node, ast.Attribute) and node.attr in KIND_NAMES)


def _names_a_kind(node: ast.AST, kinds: set[str]) -> bool:
    """A string that is an index kind's name, or a tuple / list / set holding one."""
    if isinstance(node, ast.Constant):
        return node.value in kinds
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_names_a_kind(e, kinds) for e in node.elts)


def kind_dispatch(package_dir: Path, kinds: set[str]) -> list[str]:
    """``path:line`` of every branch on an index kind's name outside ``index/kinds/``: a
    comparison (``==``, ``!=``, ``in``, ``not in``) of a name or attribute called ``kind`` /
    ``index_type`` with a kind's name (or a collection of them), or a ``match`` on one."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if rel.parts[:2] == ("index", "kinds"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                hit = any(_holds_kind(s) for s in sides) and any(_names_a_kind(s, kinds) for s in sides)
            elif isinstance(node, ast.Match):
                hit = _holds_kind(node.subject) and any(
                    isinstance(c.pattern, ast.MatchValue) and _names_a_kind(c.pattern.value, kinds) for c in node.cases)
            else:
                continue
            if hit:
                out.append((str(rel), node.lineno))
    return [f"{rel}:{line}" for rel, line in sorted(out)]


def _index_kinds() -> set[str]:
    from fewshot.index.kinds import AUTO, list_kinds

    return {*list_kinds(), AUTO}


def test_no_dispatch_on_index_kind_names_outside_index_kinds():
    """What an index type does is its kind's (fewshot/index/kinds/, one file per kind), never an
    ``if kind == "ivfpq"`` elsewhere: adding a kind is one file plus one import line."""
    assert kind_dispatch(PACKAGE, _index_kinds()) == []


def kind_names_written(package_dir: Path, kinds: set[str]) -> list[str]:
    """``path:line name`` of every string that is an index kind's name outside ``index/kinds/``
    (a lookup table or a list of pairs keyed by kind names is a branch on them too)."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if rel.parts[:2] != ("index", "kinds"):
            out += [(str(rel), node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in kinds]
    return [f"{rel}:{line} {name}" for rel, line, name in sorted(out)]


def test_index_kind_names_are_written_only_in_index_kinds():
    from fewshot.index.kinds import list_kinds

    assert kind_names_written(PACKAGE, set(list_kinds())) == []


def test_the_kind_check_finds_planted_dispatch(tmp_path):
    pkg = tmp_path / "toypkg"
    (pkg / "index" / "kinds").mkdir(parents=True)
    (pkg / "a.py").write_text(
        "def f(cfg, kind, index_type, spec, mode):\n"
        "    if cfg.ann.kind == 'ivfpq':\n"               # 2: an attribute
        "        return 1\n"
        "    if index_type in ('flat', 'hnsw'):\n"        # 4: membership in a tuple
        "        return 2\n"
        "    x = 3 if 'flat' != kind else 4\n"            # 6: the name on the right
        "    match kind:\n"                               # 7: a match
        "        case 'hnsw':\n"
        "            return 5\n"
        "    if spec['kind'] == 'mlp' or mode == 'flat' or kind == 'other':\n"  # not an index kind branch
        "        return 6\n"
        "    return x\n")
    (pkg / "index" / "kinds" / "flat.py").write_text("def g(kind):\n    return kind == 'flat'\n")  # its own file
    assert kind_dispatch(pkg, {"flat", "ivfpq", "hnsw", "auto"}) == ["a.py:2", "a.py:4", "a.py:6", "a.py:7"]
    other = tmp_path / "other"
    (other / "index" / "kinds").mkdir(parents=True)
    (other / "b.py").write_text("STEPS = {'flat': 1, 'ivfpq': 2}\nNOTE = 'a flat index'\n")
    (other / "index" / "kinds" / "flat.py").write_text("NAME = 'flat'\n")
    assert kind_names_written(other, {"flat", "ivfpq", "hnsw"}) == ["b.py:1 flat", "b.py:1 ivfpq"]


# --------------------------------------------------------------------------- who touches an index folder
#: the packages that own an index folder's journal and enrolled photos
FOLDER_OWNERS = {"catalogue", "index"}
#: names that address the journal or the enrolled photos of an index folder
FOLDER_NAMES = {"ENROLLED_DIR", "JOURNAL_DIR", "Journal", "Change"}


def folder_touches(package_dir: Path) -> list[str]:
    """``path:line what`` of every module outside :data:`FOLDER_OWNERS` that touches an index
    folder's journal or enrolled photos: it imports a journal module or one of
    :data:`FOLDER_NAMES`, joins a path with ``"journal"`` / ``"enrolled"``, or globs for the
    journal's temporary names (``.*.tmp``)."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if len(rel.parts) > 1 and rel.parts[0] in FOLDER_OWNERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, module in _imports(path, package_dir):
            if module.split(".")[-1] == "journal":
                out.append(f"{rel}:{line} imports {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(package_dir.name)):
                out += [f"{rel}:{node.lineno} imports {a.name}" for a in node.names if a.name in FOLDER_NAMES]
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_folder_text(node.right):
                out.append(f"{rel}:{node.lineno} joins a path with {node.right.value!r}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("glob", "rglob") and node.args and isinstance(node.args[0], ast.Constant)
                  and ".tmp" in str(node.args[0].value)):
                out.append(f"{rel}:{node.lineno} globs for {node.args[0].value!r}")
    return sorted(out, key=lambda text: (text.split(":")[0], int(text.split(":")[1].split()[0])))


def _is_folder_text(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.split("/")[0] in ("journal", "enrolled"))


def test_only_the_catalogue_and_the_index_touch_journal_files_and_enrolled_photos():
    assert folder_touches(PACKAGE) == []


def test_the_folder_check_finds_what_the_service_did_before(tmp_path):
    """The service of before the catalogue package: it imported the journal and ENROLLED_DIR,
    globbed the journal's temporary names and joined paths with "journal" (serve/app.py)."""
    pkg = tmp_path / "toypkg"
    (pkg / "serve").mkdir(parents=True)
    (pkg / "catalogue").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "catalogue" / "__init__.py").write_text("ENROLLED_DIR = 'enrolled'\n")
    (pkg / "catalogue" / "journal.py").write_text("JOURNAL_DIR = 'journal'\n")
    (pkg / "catalogue" / "store.py").write_text("def f(d):\n    return list((d / 'journal').glob('.*.tmp'))\n")
    (pkg / "serve" / "__init__.py").write_text("")
    (pkg / "serve" / "app.py").write_text(
        "from ..catalogue import ENROLLED_DIR\nfrom ..catalogue.journal import JOURNAL_DIR\n\n\n"
        "def leftovers(index_dir):\n    journal = index_dir / 'journal'\n    return list(journal.glob('.*.tmp'))\n")
    assert folder_touches(pkg) == ["serve/app.py:1 imports ENROLLED_DIR",
                                   "serve/app.py:2 imports toypkg.catalogue.journal",
                                   "serve/app.py:2 imports JOURNAL_DIR", "serve/app.py:6 joins a path with 'journal'",
                                   "serve/app.py:7 globs for '.*.tmp'"]


# --------------------------------------------------------------------------- file length, test layout
MAX_FILE_LINES = 450
TESTS = Path(__file__).resolve().parent
#: test files that check the package as a whole (or a one-file module) stay at the top of tests/
CROSS_CUTTING = {"test_architecture.py", "test_reliability.py", "test_docs_examples.py", "test_docs_site.py",
                 "test_packaging.py", "test_readme_examples.py", "test_readme_own_photos.py", "test_api.py",
                 "test_registry.py", "test_viz.py"}


def long_files(package_dir: Path, limit: int = MAX_FILE_LINES) -> list[str]:
    """``path (lines)`` of every module longer than ``limit`` lines."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(package_dir)} ({n})")
    return out


def test_no_file_over_450_lines():
    assert long_files(PACKAGE) == []


def test_the_file_check_counts_lines(tmp_path):
    (tmp_path / "ok.py").write_text("x = 1\n" * MAX_FILE_LINES)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert long_files(tmp_path) == [f"{Path('sub') / 'big.py'} ({MAX_FILE_LINES + 1})"]


def misplaced_tests(tests_dir: Path, package_dir: Path) -> list[str]:
    """Test files that do not mirror the source: a folder of tests/ that is not a package of
    ``package_dir`` (``tests/catalogue/`` for ``fewshot/catalogue/``), or a test file at the top
    of tests/ that is not one of :data:`CROSS_CUTTING`."""
    out = [p.name for p in sorted(tests_dir.glob("test_*.py")) if p.name not in CROSS_CUTTING]
    for folder in sorted(p for p in tests_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if any(folder.rglob("test_*.py")) and not (package_dir / folder.name / "__init__.py").is_file():
            out.append(f"{folder.name}/")
    return out


def test_tests_mirror_the_source():
    assert misplaced_tests(TESTS, PACKAGE) == []


def test_the_layout_check_finds_misplaced_tests(tmp_path):
    pkg, tests = tmp_path / "pkg", tmp_path / "tests"
    (pkg / "catalogue").mkdir(parents=True)
    (pkg / "catalogue" / "__init__.py").write_text("")
    for rel in ("catalogue/test_a.py", "nowhere/test_b.py", "test_architecture.py", "test_loose.py"):
        (tests / rel).parent.mkdir(parents=True, exist_ok=True)
        (tests / rel).write_text("")
    assert misplaced_tests(tests, pkg) == ["test_loose.py", "nowhere/"]
