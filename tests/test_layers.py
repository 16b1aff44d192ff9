"""The import graph has floors (docs/ARCHITECTURE.md, "Floors"): every import of our packages, those
inside functions included, is checked against the rule, and no two modules import each other. Test
modules import only helpers (tests/helpers/, conftest.py), never one another; no product module is
over MAX_LINES lines."""
import ast
import functools
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("storage", "schemas", "lifecycle", "beam_pipelines", "generation", "training", "bft")
ALLOWED = {
    "storage": set(),
    "schemas": {"storage"},
    "lifecycle": {"storage", "schemas"},
    "beam_pipelines": {"storage", "schemas", "lifecycle"},
    "generation": {"storage", "schemas", "lifecycle"},
    "training": {"storage", "schemas", "lifecycle", "generation.prompting", "generation.templates"},
    "bft": set(PACKAGES),
}
MAX_LINES = 450   # a module a reader can hold: one concern each


@functools.cache   # read by several tests; the files do not change during a run
def imports() -> dict[str, set[str]]:
    """{module: the modules of our packages it imports} over every .py file of the packages."""
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found = set()
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                    if isinstance(node, ast.Import):
                        found |= {a.name for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                out[module] = {m for m in found if m.split(".")[0] in PACKAGES}
    return out


def allowed(module: str, target: str) -> bool:
    own = module.split(".")[0]
    if target.split(".")[0] == own:
        return True
    return any(target == a or target.startswith(a + ".") for a in ALLOWED[own])


def test_every_import_respects_the_floors():
    graph = imports()
    assert len(graph) > 50
    broken = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if not allowed(m, t) and not (t.rsplit(".", 1)[0] in graph and allowed(m, t.rsplit(".", 1)[0])))
    assert not broken, "imports across floors:\n" + "\n".join(broken)


def test_no_two_modules_import_each_other():
    graph = imports()
    modules = set(graph)
    edges = {m: {t if t in modules else t.rsplit(".", 1)[0] for t in ts} & modules - {m} for m, ts in graph.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, ts in edges.items() for b in ts if a in edges.get(b, set())
                    and not (a.startswith(b + ".") or b.startswith(a + "."))})   # a package and its own module
    assert not pairs, f"modules importing each other: {pairs}"


def test_one_list_of_stages():
    """The stage list is written once (schemas.recipes.STAGES); every other list derives from it."""
    from beam_pipelines.assemble import recipes
    from bft import config
    from generation.stages import STAGES as SPECS
    from schemas.recipes import ANSWER_STAGES, RECIPES, STAGES

    assert tuple(SPECS) == STAGES and config.STAGE_SECTIONS == STAGES and recipes.ALL_STAGES == list(STAGES)
    assert {s for r in RECIPES.values() for s in r.stages} <= set(STAGES)
    assert ANSWER_STAGES == ("rewrite", "distill")
    # the answering stages' default gate is the recipes' (the default recipe's first), not a literal
    from schemas.recipes import DEFAULT_RECIPE

    assert SPECS[RECIPES[DEFAULT_RECIPE].answer].gate == RECIPES[DEFAULT_RECIPE].gate
    assert {s: SPECS[s].gate for s in STAGES if SPECS[s].gate} == {
        r.answer: r.gate for r in RECIPES.values() if r.answer and r.gate}


def imports_a_test_module(name: str) -> bool:
    """Whether an imported name is (inside) a module tests/test_*.py."""
    parts = name.split(".")
    return parts[0] == "tests" and any(p.startswith("test_") for p in parts[1:])


def test_no_test_module_imports_another():
    """A test module is never a library: what several modules share lives in tests/helpers/ or conftest.py,
    so running, moving or deleting one test module never changes another's."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):   # `from tests import test_x`, `from .test_x import y` too
                    base = f"tests.{node.module or ''}" if node.level else node.module
                    targets = [f"{base}.{a.name}" for a in node.names]
                else:
                    continue
                if any(map(imports_a_test_module, targets)):
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not found, "test modules imported as libraries (move what they share to tests/helpers/ or " \
                      "conftest.py): " + ", ".join(found)


def test_no_product_module_is_over_max_lines():
    long = []
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        n = sum(1 for _ in f)
                    if n > MAX_LINES:
                        long.append(f"{os.path.relpath(path, ROOT)} ({n})")
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): " + ", ".join(sorted(long))


def test_the_architecture_tree_is_the_folder_tree():
    """docs/ARCHITECTURE.md's folder tree names every product folder and module, and nothing else."""
    import re

    text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8").read()
    block = text.split("## The folder tree")[1].split("```")[1]
    drawn, path = {}, []
    for line in block.strip("\n").splitlines():
        m = re.match(r"^( *)(\w+)/ +(.*)$", line)
        if m:
            depth = len(m.group(1)) // 2
            path = path[:depth] + [m.group(2)]
            folder, rest = "/".join(path), m.group(3)
        else:
            rest = line.strip()
        names = rest.split(":", 1)[1] if ":" in rest and m else rest if not m else ""
        names = re.sub(r"\([^)]*\)", "", names)   # what a module holds, in brackets
        drawn.setdefault(folder, set()).update(re.findall(r"\b[a-z_]+\b", names))
    actual = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            if "__pycache__" in folder:
                continue
            mods = {f[:-3] for f in files if f.endswith(".py") and f != "__init__.py"}
            if mods or os.path.exists(os.path.join(folder, "__init__.py")):
                actual[os.path.relpath(folder, ROOT)] = mods
    assert set(drawn) == set(actual), set(drawn) ^ set(actual)
    for folder, mods in actual.items():
        assert mods <= drawn[folder], f"{folder}: not drawn: {sorted(mods - drawn[folder])}"
