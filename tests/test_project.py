"""The project's own files agree: requirements state lower bounds for exactly what the code imports,
constraints.txt pins the CI pair, environment.yml matches requirements.txt and the README's Python."""
import ast
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Import name -> package name where they differ.
PACKAGES = {"PIL": "pillow", "sklearn": "scikit-learn", "torch_fidelity": "torch-fidelity"}
# Needed without being imported by name: accelerate loads tensorboard for --report-to tensorboard.
RUNTIME_ONLY = {"tensorboard"}


def requirement_names(lines):
    return [re.split(r"[<>=!~ ]", line.strip())[0] for line in lines if line.strip() and not line.startswith("#")]


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def imported_packages():
    """Third-party packages imported by the project's code (scripts, diffusion/, not tests or benches)."""
    found = set()
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    files += [os.path.join("diffusion", f) for f in os.listdir(os.path.join(ROOT, "diffusion")) if f.endswith(".py")]
    local = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")} | {"diffusion"}
    for path in files:
        for node in ast.walk(ast.parse(read(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.add(PACKAGES.get(top, top))
    return found


def test_requirements_are_lower_bounds_of_what_the_code_imports():
    lines = read("requirements.txt").splitlines()
    assert not [line for line in lines if "==" in line and not line.startswith("#")]  # a cluster keeps its torch
    assert set(requirement_names(lines)) == imported_packages() | RUNTIME_ONLY


def test_constraints_pin_the_ci_pair_and_ci_uses_them():
    pins = dict(line.split("==") for line in read("constraints.txt").splitlines() if "==" in line)
    assert set(pins) == {"torch", "torchvision"}
    assert "-c constraints.txt" in read(".ci/run")
    quickstart = read("README.md").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quickstart.splitlines() if line.startswith("pip install")]
    assert len(commands) == 2 and all("-r requirements.txt -c constraints.txt" in c for c in commands)


def test_environment_matches_requirements_and_readme():
    env = yaml.safe_load(read("environment.yml"))
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == [line for line in read("requirements.txt").splitlines() if line and not line.startswith("#")]
    (python,) = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert f"Python {python.split('=')[1]}" in read("README.md")
