"""The layout's promises (README, "How the code is organised"): the lower floor (the six modules of the paper,
the run's plumbing, distributed setup, the attention study) imports nothing of the miniature or the benchmark,
there is no import cycle among the project's modules, vat.py and taf.py import nothing of the project, the
plumbing imports nothing above it, and nothing the repository says points to a document the repository lacks."""
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("model.py", "taf.py", "vat.py", "losses.py", "train.py", "data.py", "evaluate.py",
        "runs.py", "distributed.py", "attention.py", "lmms_plugin.py")
UPPER = ("shapes.py", "demo.py", "bench.py", "verdict.py")
PROJECT = {os.path.splitext(f)[0] for f in CORE + UPPER}


def project_imports(name: str) -> set:
    """Every project module `name` imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, name)).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_core_modules_import_no_miniature_or_benchmark_code():
    for name in CORE:
        upper = project_imports(name) & {os.path.splitext(f)[0] for f in UPPER}
        assert not upper, f"{name} imports {sorted(upper)}"


def test_vat_taf_and_losses_import_nothing_of_the_project():
    for name in ("vat.py", "taf.py", "losses.py"):
        assert project_imports(name) == set(), name


def test_the_plumbing_imports_nothing_above_it():
    """distributed.py stands alone; runs.py needs only distributed.py (whole tensors for a checkpoint);
    train.py imports both, never the reverse."""
    assert project_imports("distributed.py") == set()
    assert project_imports("runs.py") == {"distributed"}


def test_every_python_file_is_on_a_floor():
    """A new module is placed on purpose: named here (and in README's table), not merely added."""
    files = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == set(CORE + UPPER), sorted(files ^ set(CORE + UPPER))
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("## How the code is organised"):]
    assert not [f for f in files if f"| `{f}` |" not in table], "README's table misses a module"


def test_no_import_cycle():
    graph = {os.path.splitext(f)[0]: project_imports(f) for f in CORE + UPPER}

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen
    cycles = [m for m in graph if m in reach(m)]
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_every_document_cited_is_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    private = re.compile(r"\b(METHOD|FORMATS|DESIGN)\.md\b|shared/(paper|benchmarks)")
    cited = re.compile(r"(?<![\w/-])(docs/[\w-]+\.md|[A-Z][A-Z_]*\.md)\b")  # not run outputs (results.md)
    for f in files:
        if not f.endswith((".py", ".md")) or f == "tests/test_layout.py":
            continue
        text = open(os.path.join(ROOT, f)).read()
        assert not private.search(text), f"{f} cites a document users do not have: {private.search(text).group(0)}"
        for doc in set(cited.findall(text)):
            assert doc in files, f"{f} cites {doc}, not in the repository"
