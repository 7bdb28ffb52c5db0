"""The house follows the data: only the entry (``rnnify``) composes the packages; below it the kernels import
nothing of ours, the student runtime only the kernels, conversion neither trainer nor judge, and the trainer and
the judge not each other.  Read from the source's import statements, so a new import that breaks a rule fails."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = {"convert", "distill", "eval", "rnnify", "rnnify_kernels"}
FOLDERS = {"convert": REPO / "convert", "distill": REPO / "distill", "eval": REPO / "eval", "rnnify": REPO / "rnnify",
           "rnnify_kernels": REPO / "kernels" / "rnnify_kernels"}


def imports_of(path: Path) -> set[str]:
    """Dotted names of ours that ``path`` imports (absolute imports; relative ones stay inside their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {n for n in names if n.split(".")[0] in OURS}


def files(package: str, under: str = "") -> list[Path]:
    return sorted((FOLDERS[package] / under).rglob("*.py"))


def offenders(paths, allowed) -> dict[str, set[str]]:
    """{file: its imports of ours that ``allowed(name)`` refuses}."""
    bad = {}
    for path in paths:
        refused = {n for n in imports_of(path) if not allowed(n)}
        if refused:
            bad[str(path.relative_to(REPO))] = refused
    return bad


def test_the_kernels_import_nothing_of_ours():
    assert offenders(files("rnnify_kernels"), lambda n: n.startswith("rnnify_kernels")) == {}


def test_the_student_runtime_imports_only_the_kernels():
    assert files("convert", "student")
    assert offenders(files("convert", "student"), lambda n: n.startswith("rnnify_kernels")) == {}


def test_conversion_imports_neither_trainer_nor_judge():
    converter = [p for p in files("convert") if p.name != "__main__.py"]   # __main__: `python -m convert`, the entry
    allowed = lambda n: n.startswith(("convert", "rnnify_kernels", "rnnify.store"))  # noqa: E731
    assert offenders(converter, allowed) == {}
    assert imports_of(REPO / "convert" / "__main__.py") == {"rnnify.cli", "rnnify.cli.main"}


def test_trainer_and_judge_use_the_student_they_are_handed_not_each_other():
    assert offenders(files("distill"), lambda n: not n.startswith(("eval", "rnnify")) or n.startswith("rnnify.store")) \
        == {}
    assert offenders(files("eval"), lambda n: not n.startswith(("distill", "rnnify")) or n.startswith("rnnify.store")
                     or n.startswith("rnnify_kernels")) == {}


def test_the_store_is_a_leaf():
    assert imports_of(REPO / "rnnify" / "store.py") == set()


def test_no_file_of_the_entry_is_a_hub():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in files("rnnify")}
    assert {p: n for p, n in sizes.items() if n > 300} == {}
