"""The kernel registry's parts: typed parameters, checks before rendering, mangled names,
rendering with a parse check, and the helpers the kernel entries share.

A kernel is a `templates/NAME.mlir.j2` file defining `util.func private @{{name}}`, plus a
`Kernel` entry saying what its parameters are and which values are legal. The entries live
next to their numpy references (`quantized.py`, `attention.py`, `fp8.py`, `moe.py`), which the
workbench (`halo-mlir kernel check`) and the tests share.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.errors import HaloError

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"


@dataclasses.dataclass(frozen=True)
class Param:
    kind: type  # int or str
    doc: str
    check: Callable[[object], str | None] = lambda v: None  # an error message or None
    default: object = None  # None: required
    choices: tuple = ()  # for str parameters: the legal values
    omit_default: bool = False  # at its default the parameter is left out of the symbol

    def describe(self) -> str:
        what = "|".join(self.choices) if self.choices else self.kind.__name__
        shown = f" (default {self.default})" if self.default is not None else " (required)"
        return f"{what}{shown}: {self.doc}"


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument or result of a kernel at concrete sizes: shape () is a scalar."""
    name: str
    shape: tuple
    dtype: str


@dataclasses.dataclass(frozen=True)
class Harness:
    """How the workbench runs a kernel: runtime sizes (the template's dynamic dims), the
    argument/result list at those sizes, random inputs, the numpy reference, tolerance."""
    sizes: dict  # runtime size -> (default for `check`, default for `bench`, doc)
    args: Callable  # (values, sizes) -> (list[Arg], list[Arg] results)
    inputs: Callable  # (values, sizes, rng) -> list[np.ndarray] (in the Args' dtypes)
    reference: Callable  # (values, inputs) -> list[np.ndarray]
    tolerance: Callable  # values -> max |error| accepted


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    doc: str
    params: dict[str, Param]
    constraints: Callable[[dict], str | None] = lambda v: None  # across parameters
    derived: Callable[[dict], dict] = lambda v: {}  # extra template values
    harness: Harness | None = None

    def mangle(self, values: dict) -> str:
        """Deterministic symbol: `halo_<kernel>_<param><value>...` in parameter order."""
        return "halo_" + self.name + "".join(
            f"_{p}{values[p]}" for p, spec in self.params.items()
            if not (spec.omit_default and values[p] == spec.default))

    def validate(self, values: dict) -> dict:
        unknown = set(values) - set(self.params)
        if unknown:
            raise HaloError(f"kernel {self.name}: unknown parameter {sorted(unknown)[0]!r}; "
                            f"parameters: {', '.join(self.params)}")
        out = {}
        for p, spec in self.params.items():
            if p not in values:
                if spec.default is None:
                    raise HaloError(f"kernel {self.name}: parameter {p!r} is required "
                                    f"({spec.doc})")
                values[p] = spec.default
            if not isinstance(values[p], spec.kind) or isinstance(values[p], bool):
                raise HaloError(f"kernel {self.name}: {p} must be {spec.kind.__name__}, "
                                f"got {values[p]!r}")
            if spec.choices and values[p] not in spec.choices:
                raise HaloError(f"kernel {self.name}: {p}={values[p]} is not one of "
                                f"{', '.join(spec.choices)}")
            problem = spec.check(values[p])
            if problem:
                raise HaloError(f"kernel {self.name}: {p}={values[p]} {problem}")
            out[p] = values[p]
        problem = self.constraints(out)
        if problem:
            raise HaloError(f"kernel {self.name}: {problem}")
        return out

    def parse_params(self, pairs: list[str]) -> dict:
        """`k=v` strings (the CLI's --param) -> typed values."""
        values = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep:
                raise HaloError(f"--param expects NAME=VALUE, got {pair!r}")
            spec = self.params.get(key)
            if spec is None:
                raise HaloError(f"kernel {self.name}: unknown parameter {key!r}; "
                                f"parameters: {', '.join(self.params)}")
            try:
                values[key] = spec.kind(raw)
            except ValueError:
                raise HaloError(f"kernel {self.name}: {key} must be {spec.kind.__name__}, "
                                f"got {raw!r}") from None
        return values


def _cast_line(dtype: str):
    """Template helper: `cast(src, dst)` -> one line making `dst` (in `dtype`) from the f32
    `src` (an identity bitcast for f32, so the template needs no branch)."""
    def cast(src: str, dst: str) -> str:
        op = "bitcast" if dtype == "f32" else "truncf"
        return f"    {dst} = arith.{op} {src} : f32 to {dtype}"
    return cast


def render(kernel: Kernel, values: dict, template_dir: Path | None = None) -> tuple[str, str]:
    """(symbol name, MLIR text) of one specialisation."""
    import jinja2

    values = kernel.validate(dict(values))
    name = kernel.mangle(values)
    where = Path(template_dir or TEMPLATE_DIR)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(where)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    extra = {"cast": _cast_line(values.get("out_dtype", values.get("dtype", "f32"))),
             **kernel.derived(values)}
    try:
        text = env.get_template(f"{kernel.name}.mlir.j2").render(name=name, **values, **extra)
    except jinja2.TemplateNotFound:
        raise HaloError(f"kernel {kernel.name}: template {kernel.name}.mlir.j2 not found in "
                        f"{where}") from None
    except jinja2.TemplateSyntaxError as e:
        raise HaloError(f"kernel {kernel.name}: template error at {kernel.name}.mlir.j2:"
                        f"{e.lineno}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise HaloError(f"kernel {kernel.name}: template error at {kernel.name}.mlir.j2:"
                        f"{_template_line(e, kernel.name)}: {e}") from None
    _check_parses(kernel, name, text, where / f"{kernel.name}.mlir.j2")
    return name, text


def _check_parses(kernel: Kernel, symbol: str, text: str, template: Path) -> None:
    """Parse the rendered text alone; on failure one line naming the template line (the
    template line whose literal parts match the failing rendered line), then the rendered
    text with line numbers."""
    import re

    from iree.compiler import ir

    with ir.Context():
        try:
            ir.Module.parse(text)
            return
        except ir.MLIRError as e:
            message = " ".join(str(e).split())
    found = re.search(r":(\d+):(\d+): (?:error: )?(.*?)(?: note:|$)", message)
    lines = text.splitlines()
    where = ""
    if found and 0 < int(found.group(1)) <= len(lines):
        rendered = lines[int(found.group(1)) - 1]
        hits = []
        for i, src in enumerate(template.read_text().splitlines()):
            parts = re.split(r"{{.*?}}", src.strip())  # the line's literal text
            if "".join(parts).strip() and re.fullmatch(
                    ".*".join(map(re.escape, parts)), rendered.strip()):
                hits.append(i + 1)
        line = f"{template.name}:{hits[0]}" if len(hits) == 1 else \
            f"rendered line {found.group(1)}"
        where = f" at {line}: {found.group(3)} (`{rendered.strip()}`)"
    numbered = "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(lines))
    raise HaloError(f"kernel {kernel.name}: the rendered MLIR does not parse{where or ': ' + message}"
                    f"\n{numbered}")


def _template_line(e: Exception, name: str) -> str:
    """The template line of a render-time error (from jinja's rewritten traceback)."""
    tb, line = e.__traceback__, "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(f"{name}.mlir.j2"):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


# ---- parameter checks shared by the entries -------------------------------------------
def positive_multiple_of(n: int) -> Callable[[int], str | None]:
    return lambda v: None if v > 0 and v % n == 0 else f"must be a positive multiple of {n}"


def positive(v: int) -> str | None:
    return None if v > 0 else "must be positive"


def softmax_scale(values: dict) -> dict:
    """1/sqrt(head_dim) as the f32 the fused op uses, printed exactly."""
    return {"scale": repr(float(np.float32(1.0 / math.sqrt(values["head_dim"]))))}


def numpy_dtype(dtype: str):
    """The numpy type of an MLIR element type name (bf16 and fp8 from ml_dtypes)."""
    import ml_dtypes

    table = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16,
             "f8E4M3FNUZ": ml_dtypes.float8_e4m3fnuz, "i64": np.int64, "i32": np.int32,
             "i16": np.int16, "i8": np.int8}
    return table[dtype]
