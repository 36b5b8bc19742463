# lit configuration: IR tests of the emitted ops and programs, checked with FileCheck.
import os
import shutil
import sys

import lit.formats

config.name = "halo_mlir"
config.test_format = lit.formats.ShTest(execute_external=False)  # lit's internal shell
config.suffixes = [".py", ".mlir"]
config.excludes = ["lit.cfg.py", "lit_util.py", "Output"]
config.test_source_root = os.path.dirname(__file__)
config.environment["PYTHONPATH"] = os.pathsep.join(
    [config.test_source_root, os.environ.get("PYTHONPATH", "")])
for var in ("HOME", "PATH", "TMPDIR"):
    if var in os.environ:
        config.environment[var] = os.environ[var]

python = sys.executable
bindir = os.path.dirname(python)
config.substitutions.append(("%python", python))
config.substitutions.append(("%halo", f"{python} -m halo_mlir"))
config.substitutions.append(("%FileCheck", shutil.which("filecheck", path=bindir) or "filecheck"))
config.substitutions.append(("%iree-opt", shutil.which("iree-opt", path=bindir) or "iree-opt"))
