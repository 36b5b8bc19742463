"""Templated MLIR kernels: typed parameters, checks before rendering, mangled names, one
instantiation per specialisation per module.

A kernel is a `templates/NAME.mlir.j2` file defining `util.func private @{{name}}`, plus a
`Kernel` entry here saying what its parameters are and which values are legal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from halo_mlir.errors import HaloError

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"


@dataclasses.dataclass(frozen=True)
class Param:
    kind: type  # int or str
    doc: str
    check: Callable[[object], str | None] = lambda v: None  # an error message or None


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    doc: str
    params: dict[str, Param]

    def mangle(self, values: dict) -> str:
        """Deterministic symbol: `halo_<kernel>_<param><value>...` in parameter order."""
        return "halo_" + self.name + "".join(f"_{p}{values[p]}" for p in self.params)

    def validate(self, values: dict) -> dict:
        unknown = set(values) - set(self.params)
        if unknown:
            raise HaloError(f"kernel {self.name}: unknown parameter {sorted(unknown)[0]!r}; "
                            f"parameters: {', '.join(self.params)}")
        for p, spec in self.params.items():
            if p not in values:
                raise HaloError(f"kernel {self.name}: parameter {p!r} is required ({spec.doc})")
            if not isinstance(values[p], spec.kind):
                raise HaloError(f"kernel {self.name}: {p} must be {spec.kind.__name__}, "
                                f"got {values[p]!r}")
            problem = spec.check(values[p])
            if problem:
                raise HaloError(f"kernel {self.name}: {p}={values[p]} {problem}")
        return values


def render(kernel: Kernel, values: dict, template_dir: Path | None = None) -> tuple[str, str]:
    """(symbol name, MLIR text) of one specialisation."""
    import jinja2

    values = kernel.validate(dict(values))
    name = kernel.mangle(values)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir or TEMPLATE_DIR)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        text = env.get_template(f"{kernel.name}.mlir.j2").render(name=name, **values)
    except jinja2.TemplateNotFound:
        raise HaloError(f"kernel {kernel.name}: template {kernel.name}.mlir.j2 not found in "
                        f"{template_dir or TEMPLATE_DIR}") from None
    except jinja2.TemplateError as e:
        line = getattr(e, "lineno", "?")
        raise HaloError(f"kernel {kernel.name}: template error at {kernel.name}.mlir.j2:{line}: "
                        f"{e}") from None
    return name, text


def _positive_multiple_of(n: int) -> Callable[[int], str | None]:
    return lambda v: None if v > 0 and v % n == 0 else f"must be a positive multiple of {n}"


def _positive(v: int) -> str | None:
    return None if v > 0 else "must be positive"


_QUANT_PARAMS = {
    "n": Param(int, "rows of the weight (output features)", _positive),
    "k": Param(int, "columns of the weight (input features)", _positive_multiple_of(32)),
}

KERNELS: dict[str, Kernel] = {k.name: k for k in [
    Kernel("q8_0_matmul", "x[M,K] f32 @ Q8_0 w[N,K]^T -> [M,N] f32", _QUANT_PARAMS),
    Kernel("q4_1_matmul", "x[M,K] f32 @ Q4_1 w[N,K]^T -> [M,N] f32", _QUANT_PARAMS),
    Kernel("q8_0_rows", "rows ids[T] of Q8_0 w[N,K], dequantized -> [T,K] f32", _QUANT_PARAMS),
    Kernel("q4_1_rows", "rows ids[T] of Q4_1 w[N,K], dequantized -> [T,K] f32", _QUANT_PARAMS),
]}


def kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise HaloError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}") from None


def instantiate(b, name: str, template_dir: Path | None = None, **values) -> str:
    """Render kernel `name` with `values` into b's module (once) and return its symbol."""
    symbol, text = render(kernel(name), values, template_dir)
    b.add_text_once(symbol, text)
    return symbol
