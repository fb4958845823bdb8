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
# Lowest first: a module may import its own wing and the ones before it. `errors` and `lazy` (the wings' __init__s'
# public names) import nothing of vlrm and are below all.
WINGS = ("errors", "lazy", "data", "layout", "model", "train", "use")
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


def run_elsewhere(code: str, directory: Path) -> subprocess.CompletedProcess:
    """``python -c code`` in ``directory``, without this checkout on PYTHONPATH: the installed package."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=directory, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_old_scoring_path_still_imports_with_a_warning(tmp_path):
    """``from vlrm.scoring import RewardScorer`` (the README's path before the wings) keeps working from any directory,
    gives the same class, and warns with the path to use instead."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import vlrm.scoring\nexcept DeprecationWarning as warning:\n    print('warned:', warning)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import importlib, vlrm; old = importlib.import_module('vlrm.scoring')\n"
        "assert old.RewardScorer is vlrm.RewardScorer; print('same class')"
    )
    finished = run_elsewhere(code, tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "warned: vlrm.scoring moved into vlrm.use.scoring" in finished.stdout and "same class" in finished.stdout


def test_public_api_from_another_directory_is_cheap_until_used(tmp_path):
    code = (
        "import sys, vlrm; assert 'torch' not in sys.modules, 'import vlrm loaded torch'; "
        "from vlrm import RewardScorer, VLRewardFunction, VLRewardModel, load_config; "
        "print(RewardScorer.__module__, VLRewardFunction.__module__, VLRewardModel.__module__)"
    )
    finished = run_elsewhere(code, tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["vlrm.use.scoring", "vlrm.use.rewards", "vlrm.model.reward_model"]


def test_using_the_reward_loads_no_training_stack(tmp_path):
    """Scoring, the GRPO reward function, process and joint scoring import neither TRL, datasets, DeepSpeed nor the
    server's FastAPI: a GPU node that only uses a reward (the GPU check's machine, an RL trainer's) needs transformers,
    peft and accelerate, and importing a wing imports none of its modules until a name is used."""
    code = (
        "import sys\n"
        "import vlrm.data, vlrm.layout, vlrm.model, vlrm.train, vlrm.use\n"
        "print(sorted(name for name in sys.modules if name.startswith('vlrm.')))\n"
        "from vlrm.use import RewardScorer, VLRewardFunction\n"
        "import vlrm.use.process, vlrm.use.joint, vlrm.model.loading\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & "
        "{'trl', 'datasets', 'deepspeed', 'fastapi', 'uvicorn', 'av'}))\n"
        "import vlrm.train.trainer\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'trl', 'datasets'}))"
    )
    finished = run_elsewhere(code, tmp_path)
    assert finished.returncode == 0, finished.stderr
    wings, using, training = finished.stdout.splitlines()
    assert wings == "['vlrm.data', 'vlrm.layout', 'vlrm.lazy', 'vlrm.model', 'vlrm.train', 'vlrm.use']"
    assert using == "[]"
    assert training == "['datasets', 'trl']"  # the check above would see them if they were imported


def test_python_m_vlrm_lists_its_commands():
    finished = subprocess.run([sys.executable, "-m", "vlrm", "--help"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0
    for command in ("prepare", "export", "synthetic", "tiny"):
        assert f"python -m vlrm {command}" in finished.stdout
    unknown = subprocess.run([sys.executable, "-m", "vlrm", "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
