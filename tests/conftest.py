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
