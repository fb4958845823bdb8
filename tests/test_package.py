"""The package's shape: five wings along the data flow, imports that only point down it, no import cycle, and a
public API at ``vlrm`` that works from any directory and costs nothing to import."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import vlrm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlrm"
# Lowest first: a module may import its own wing and the ones before it. `errors` imports nothing and is below all.
WINGS = ("errors", "data", "layout", "model", "train", "use")
BESIDE = ("metrics", "tiny")  # beside the wings: imported by scripts and tests, never by a wing


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def vlrm_imports(path: Path) -> set[str]:
    """Every vlrm module a file imports, at run time or for type checking alike."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("vlrm")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vlrm"):
            names.add(node.module)
    return names


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package itself (vlrm/__init__.py, vlrm/__main__.py)


def test_imports_point_down_the_data_flow():
    wrong = []
    for module, path in MODULES.items():
        wing = wing_of(module)
        if wing not in WINGS + BESIDE:
            continue  # the package's own __init__ and __main__ may import any wing
        for target in sorted(vlrm_imports(path)):
            target_wing = wing_of(target)
            if target_wing is None:
                wrong.append(f"{module} imports the package itself ({target}): import the defining module")
            elif wing in BESIDE or target_wing in BESIDE:
                if target_wing != wing:
                    wrong.append(f"{module} imports {target}: `{wing}` and `{target_wing}` stand apart")
            elif WINGS.index(target_wing) > WINGS.index(wing):
                wrong.append(f"{module} ({wing}) imports {target}, a higher wing")
            elif target == f"vlrm.{wing}" and module.count(".") > 1:
                wrong.append(f"{module} imports its own wing's __init__ ({target}): import the defining module")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {name: (vlrm_imports(path) & set(MODULES)) - {name} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(trail[trail.index(target) :] + [target])
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_public_name_resolves():
    for name in vlrm.__all__:
        assert getattr(vlrm, name) is not None, name


def test_the_old_scoring_path_still_imports_with_a_warning(tmp_path):
    """``from vlrm.scoring import RewardScorer`` (the README's path before the wings) keeps working from any directory,
    gives the same class, and warns with the path to use instead."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import vlrm.scoring\nexcept DeprecationWarning as warning:\n    print('warned:', warning)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import importlib, vlrm; old = importlib.import_module('vlrm.scoring')\n"
        "assert old.RewardScorer is vlrm.RewardScorer; print('same class')"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert "warned: vlrm.scoring moved into vlrm.use.scoring" in finished.stdout and "same class" in finished.stdout


def test_public_api_from_another_directory_is_cheap_until_used(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = (
        "import sys, vlrm; assert 'torch' not in sys.modules, 'import vlrm loaded torch'; "
        "from vlrm import RewardScorer, VLRewardFunction, VLRewardModel, load_config; "
        "print(RewardScorer.__module__, VLRewardFunction.__module__, VLRewardModel.__module__)"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["vlrm.use.scoring", "vlrm.use.rewards", "vlrm.model.reward_model"]


def test_python_m_vlrm_lists_its_commands():
    finished = subprocess.run([sys.executable, "-m", "vlrm", "--help"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0
    for command in ("prepare", "export", "synthetic", "tiny"):
        assert f"python -m vlrm {command}" in finished.stdout
    unknown = subprocess.run([sys.executable, "-m", "vlrm", "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
