"""The install: requirements.txt is the one list of what running needs (pyproject.toml
reads it), test-only packages stay in requirements-test.txt, and tests find the
package through the install (pip install -e .), never by editing sys.path."""

import ast
import os
import re
import sys
import tomllib

from conftest import REPO_ROOT

# import name -> the distribution that provides it, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "starlette": "fastapi", "lm_eval": "lm_eval"}
TEST_ONLY = {"pytest", "hypothesis", "transformers", "peft", "trl", "openai", "selenium", "lm_eval"}


def requirement_names(name: str) -> set[str]:
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in lines if line and not line.startswith("-")}


def python_files(*roots: str) -> list[str]:
    files = []
    for root in roots:
        path = os.path.join(REPO_ROOT, root)
        if path.endswith(".py"):
            files.append(path)
            continue
        for directory, _, names in os.walk(path):
            files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    return files


def imported_modules(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_pyproject_reads_its_dependencies_from_requirements_txt():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}


def test_every_package_the_code_imports_is_required_and_no_test_tool_is():
    running = requirement_names("requirements.txt")
    testing = requirement_names("requirements-test.txt")
    assert not running & TEST_ONLY, running & TEST_ONLY  # they would cost every user gigabytes
    assert TEST_ONLY <= testing
    own = {"nanobumble", "train_pretrain", "train_sft", "train_dpo", "chat"}
    for path in python_files("nanobumble", "train_pretrain.py", "train_sft.py", "train_dpo.py", "chat.py"):
        third_party = imported_modules(path) - set(sys.stdlib_module_names) - own
        missing = {DISTRIBUTIONS.get(name, name) for name in third_party} - running
        assert not missing, f"{os.path.relpath(path, REPO_ROOT)} imports {missing}, not in requirements.txt"


def test_no_test_edits_sys_path():
    """Scripts the tests start (tests/*.py, code in strings) included."""
    edit = re.compile(r"sys\.path\s*(\.(insert|append|extend)\(|\[[^\]]*\]\s*=|\+?=)")
    found = []
    for path in python_files("tests"):
        if path == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8") as f:
            found += [f"{os.path.relpath(path, REPO_ROOT)}:{n}" for n, line in enumerate(f, 1) if edit.search(line)]
    assert not found, found
