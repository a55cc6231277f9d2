"""The package's layout is its architecture: floors that follow the data, no import cycle, plain-PyTorch
networks, entry points that do not import each other, W&B in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssd_lightning"
# Each top-level unit's floor: a module may import its own floor and those below.
FLOORS = {
    "boxes": 0, "priors": 0, "threads": 0, "plugins": 0, "checkpoint_files": 0, "conf_dir": 0,
    "visualize": 0, "optim": 0,
    "data": 1, "metrics": 1, "coverage": 1,
    "loss": 2, "postprocess": 2,
    "models": 3,
    "": 4,  # the package's own __init__ (the notebook API)
    "export": 5, "benchmark": 5, "training": 5, "runtimes": 5,
    "sweeps": 6,
    "cli": 7,
}  # fmt: skip
ENTRY_POINTS = {"train", "eval", "predict", "export", "check", "sweep_report"}


def _module_name(path: Path) -> str:
    parts = ("ssd_lightning", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The package's modules `name` imports (anywhere in the file but `if TYPE_CHECKING:`); `from pkg
    import mod` imports `pkg.mod`."""
    tree = ast.parse(MODULES[name].read_text())
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {base})
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _unit(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def _third_party(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_every_unit_has_a_floor() -> None:
    assert {_unit(name) for name in MODULES} <= FLOORS.keys()


def test_imports_go_down_the_floors_never_up() -> None:
    upward = [
        f"{name} (floor {FLOORS[_unit(name)]}) imports {dep} (floor {FLOORS[_unit(dep)]})"
        for name, deps in GRAPH.items()
        for dep in deps
        if FLOORS[_unit(dep)] > FLOORS[_unit(name)]
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("unit", ["models", "loss", "postprocess", "priors", "boxes"])
def test_the_networks_import_neither_hydra_nor_lightning(unit: str) -> None:
    for name in (n for n in MODULES if _unit(n) == unit):
        assert not _third_party(name) & {"hydra", "omegaconf", "pytorch_lightning", "lightning"}, name


def test_no_entry_point_imports_another() -> None:
    entry_points = {f"ssd_lightning.cli.{name}" for name in ENTRY_POINTS}
    for name in entry_points:
        assert not GRAPH[name] & entry_points, f"{name} imports {GRAPH[name] & entry_points}"


def test_weights_and_biases_lives_in_one_module() -> None:
    users = sorted(name for name in MODULES if "wandb" in _third_party(name))
    assert users == ["ssd_lightning.training.wandb_logging"]


def test_the_layout_test_sees_imports() -> None:  # the checks above are not vacuous
    assert "ssd_lightning.models" in GRAPH["ssd_lightning.training.module"]
    assert "ssd_lightning.boxes" in GRAPH["ssd_lightning.loss"]
    assert GRAPH["ssd_lightning.models"] and "torch" in _third_party("ssd_lightning.models.ssd")
