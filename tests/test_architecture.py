"""The layering the code relies on: a torch-free contract layer, no import cycles, one catalog."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "training_backend"


def test_config_imports_no_torch():
    """The window, the CLI's parser and any tool can read the settings and the method catalog
    without importing torch."""
    code = ("import sys, training_backend.config as c; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m); "
            "print(len(c.METHOD_CATALOG), c.TrainConfig().budget)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", "300.0"]


def test_the_layers_without_torch_import_no_torch():
    """The project store, the job side (process, runs, launchers), ranking and the CLI's parser
    import no torch: the window and a ranking server stay light."""
    modules = ["training_backend.project.store", "training_backend.project.importer",
               "training_backend.project.export", "training_backend.jobs.process",
               "training_backend.jobs.runs", "training_backend.jobs.launchers",
               "training_backend.active.acquisition", "training_backend.active.curves",
               "training_backend.cli"]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_training_backend_is_grouped_by_layer():
    """Only the contract layer and the entry points live at the top; everything else is in a
    subpackage that says what it is."""
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "__main__.py", "config.py", "errors.py", "events.py"]
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert subpackages == ["active", "cli", "jobs", "learning", "project"]
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc) > 40, f"{name}/__init__.py needs a docstring of what lives there"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ``training_backend`` module a file imports, at module level or inside functions
    (lazy imports count too), except under ``if TYPE_CHECKING``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("training_backend"):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names
                             if f"{child.module}.{a.name}" in modules)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("training_backend"))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found & modules


def test_no_import_cycle_in_the_backend():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                walk(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    # the pairs that used to import each other
    assert "training_backend.learning.trainer" not in graph["training_backend.learning.inference"]
    assert "training_backend.learning.methods.base" not in graph["training_backend.learning.data"]


def test_catalog_and_registry_agree():
    from training_backend.config import COMMON_OPTIONS, METHOD_CATALOG
    from training_backend.learning.methods import METHODS

    assert set(METHOD_CATALOG) == set(METHODS)
    for name, spec in METHOD_CATALOG.items():
        cls = METHODS[name]
        assert cls.spec is spec and cls.name == name and cls.supervision == spec.supervision
        assert cls.all_default_options() == spec.defaults()
        assert set(spec.all_options()) >= set(COMMON_OPTIONS)
        assert all(o.help for o in spec.all_options().values()), name


def test_the_window_is_an_extra_and_the_cli_says_so(monkeypatch, capsys):
    """`pip install napari-lesionseg` is the headless back end and CLI; napari and Qt come
    with the `gui` extra, and `lesionseg gui` without them says what to install."""
    import importlib.util
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = " ".join(meta["dependencies"]).lower()
    assert "torch" in base and not any(gui in base for gui in ("napari", "qtpy", "pyqt", "magicgui"))
    assert any(d.startswith("napari") for d in meta["optional-dependencies"]["gui"])

    from training_backend import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "napari" else real(name, *a))
    assert cli.main(["gui"]) == 2
    err = capsys.readouterr().err
    assert "napari-lesionseg[gui]" in err and err.count("\n") == 1


def test_a_method_can_need_several_kinds_of_annotation():
    """`requires` is any-of, `requires_all` each-of: a method that needs masks *and* image
    labels, or masks *and* images without a mask, is offered only when both are there."""
    from training_backend.config import MethodSpec, Supervision, available_methods

    def spec(name, requires_all=()):
        return MethodSpec(name, Supervision(True, True, True, True, ("full", "sparse"), requires_all), "")

    catalog = {s.name: s for s in (spec("masks"), spec("masks+labels", ("image_label",)),
                                   spec("masks+maskless", ("maskless",)))}
    assert available_methods({"full": 3}, catalog) == ["masks"]
    assert available_methods({"sparse": 1, "image_label": 4, "maskless": 0}, catalog) == [
        "masks", "masks+labels"]
    # an image-labelled case without a mask is maskless (and counts as such without the key)
    assert available_methods({"full": 3, "image_label": 2}, catalog) == [
        "masks", "masks+labels", "masks+maskless"]
    assert available_methods({"full": 3, "unlabelled": 2, "maskless": 2}, catalog) == [
        "masks", "masks+maskless"]
    assert available_methods({"image_label": 9, "maskless": 9}, catalog) == []
    assert catalog["masks+labels"].supervision.needs() == (
        "full masks or sparse masks (scribbles), and image labels")


def test_the_store_counts_cases_without_a_mask(tmp_path):
    from conftest import make_tiny_project

    project = make_tiny_project(tmp_path / "p")
    counts = project.supervision_counts()
    masked = counts["full"] + counts["sparse"]
    n_train = sum(r.split != "holdout" for r in project.cases())
    assert counts["maskless"] == n_train - masked > 0
    assert counts["maskless"] >= counts["unlabelled"]
