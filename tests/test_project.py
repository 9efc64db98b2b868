"""The project's own files agree: requirements state lower bounds for exactly what the code imports,
constraints.txt pins every version CI installs, environment.yml matches requirements.txt."""
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
# Imported only for a feature that names its install in its error (sequence.py: --sequence-parallel > 1); CI installs
# them pinned, so their tests always run.
OPTIONAL = {"deepspeed"}


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
    assert set(requirement_names(lines)) == (imported_packages() - OPTIONAL) | RUNTIME_ONLY
    assert OPTIONAL <= imported_packages()  # still used, or no longer optional


def test_constraints_pin_every_package_ci_installs_and_ci_uses_them():
    """A fresh machine resolves what CI ran: each requirement and test tool has one exact version, and CI installs
    through the constraints into a new environment."""
    pins = dict(line.split("==") for line in read("constraints.txt").splitlines() if "==" in line)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # the pair that installs on CPU machines
    tools = {"pytest", "pytest-xdist", "pytorch-fid"} | OPTIONAL
    wanted = set(requirement_names(read("requirements.txt").splitlines())) | tools
    normal = {re.sub(r"[-_.]+", "-", name).lower() for name in pins}
    assert {re.sub(r"[-_.]+", "-", name).lower() for name in wanted} <= normal
    ci = read(".ci/run")
    assert "-m venv" in ci and "-r requirements.txt -c constraints.txt pytest pytest-xdist pytorch-fid deepspeed" in ci


def test_environment_matches_requirements():
    env = yaml.safe_load(read("environment.yml"))
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == [line for line in read("requirements.txt").splitlines() if line and not line.startswith("#")]
