"""Every difference between the IREE releases we support, in one table.

halo_mlir builds IR with the installed `iree.compiler` bindings and compiles it with the
installed `iree-compile`. Two releases are supported:

- 3.13 (the default pin: the latest release);
- 3.9 (what PyPI `shortfin` 3.9.0 serves: its runtime loads only modules compiled by 3.9.x).

The emitted *text* is the same for both (the one op whose custom syntax changed,
`iree_linalg_ext.attention`, is printed in MLIR's generic form, which both parse), so a
module emitted under one release compiles with the other. What differs is below, keyed by
the installed compiler's major.minor.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from halo_mlir.errors import HaloError


@dataclasses.dataclass(frozen=True)
class IreeCompat:
    release: str
    # iree-compile flag naming the AMD GPU chip.
    rocm_target_flag: str
    # iree_linalg_ext.gather/scatter declare their operands as segments (ins, outs) in 3.9,
    # so an op created generically needs `operandSegmentSizes`; 3.13 dropped it.
    gather_scatter_segments: bool
    # The PyPI shortfin release whose runtime loads this release's modules (None: none does).
    shortfin: str | None
    # Targets on which this release cannot compile the fused iree_linalg_ext.attention with
    # our i1 mask (3.9 gfx942 crashes in the online-attention masking interface,
    # FloatType::getFloatSemantics on i1); `--attention decomposed` compiles there.
    no_fused_attention: tuple[str, ...] = ()
    # Whether the paged attention kernels compile here (3.9 on CPU: the paged decode
    # kernel's page gather needs 256 KiB of stack, the limit is 32 KiB; NOTES.md).
    paged_attention: bool = True
    # Extra iree-compile flags per target.
    extra_flags: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Whether this release computes the mixture-of-experts `grouped` prefill right (3.9 on
    # CPU does not: a prefill's logits after its first position are off by up to 5.4 on a
    # tiny Mixtral, while its `gather` form matches 3.13's to 5e-6; NOTES.md).
    moe_grouped_prefill: bool = True

    def attention_for(self, target: str) -> str:
        """The attention form that compiles for `target` under this release."""
        return "decomposed" if target in self.no_fused_attention else "fused"


TABLE: dict[str, IreeCompat] = {
    "3.9": IreeCompat(
        release="3.9",
        rocm_target_flag="--iree-hip-target",
        gather_scatter_segments=True,
        shortfin="3.9.0",
        no_fused_attention=("gfx942",),
        paged_attention=False,
        moe_grouped_prefill=False,
    ),
    "3.13": IreeCompat(
        release="3.13",
        rocm_target_flag="--iree-rocm-target",
        gather_scatter_segments=False,
        shortfin=None,
        # The fp8 cache write of a bs 4 decode at the toy's page size vectorizes to 32 KiB
        # vectors on llvm-cpu, which 3.13 refuses by default ("large vector sizes"); allowed,
        # it compiles and runs (tests/e2e/test_fp8.py). 3.9 has no such check.
        extra_flags={t: ("--iree-llvmcpu-fail-on-large-vector=false",)
                     for t in ("cpu", "cpu-generic")},
    ),
}


def release_of(version: str) -> str:
    """'3.9.0rc20251125' -> '3.9'."""
    return ".".join(version.split(".")[:2])


def installed_version() -> str:
    from iree.compiler import version

    return version.VERSION


def installed_shortfin() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("shortfin")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def current() -> IreeCompat:
    """The row for the installed iree-base-compiler (an error for an unsupported one)."""
    return for_version(installed_version())


def for_version(version: str) -> IreeCompat:
    row = TABLE.get(release_of(version))
    if row is None:
        raise HaloError(f"iree-base-compiler {version} is not supported: install one of "
                        f"{', '.join(f'{r}.x' for r in TABLE)} (see docs/versions.md)")
    return row


# ---- portable text ---------------------------------------------------------------------
# iree_linalg_ext.attention's custom syntax changed between the releases (3.9 prints and
# parses `{indexing_maps = [...]}`, 3.13 `<indexing_maps = [...]>`, each rejecting the
# other's); MLIR's generic form of the op is the same in both. The rest of our output is
# printed identically by both. (Printing the whole module generic does not work: 3.9 rejects
# 3.13's generic hal.tensor.import.)
_ATTENTION = re.compile(
    r"(?P<res>%[\w.$-]+) = iree_linalg_ext\.attention "
    r"(?:<(?P<attrs_new>indexing_maps = \[[^\]]*\])>|\{(?P<attrs_old>indexing_maps = \[[^\]]*\])\}) "
    r"ins\((?P<ins>[^:]*?) : (?P<in_types>[^)]*)\) outs\((?P<out>%[\w.$-]+) : (?P<out_type>[^)]*)\) "
    r"\{\n(?P<body>(?:.*\n)*?)(?P<indent>[ \t]*)\} -> (?P<res_type>[^\s]+)")


def _split_types(text: str) -> list[str]:
    """'tensor<1x?xf16>, f32' -> ['tensor<1x?xf16>', 'f32'] (commas inside <> kept)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "<([{":
            depth += 1
        elif c in ">)]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _generic_attention(m: re.Match) -> str:
    attrs = m["attrs_new"] or m["attrs_old"]
    operands = [*(s.strip() for s in m["ins"].split(",")), m["out"]]
    types = [*_split_types(m["in_types"]), m["out_type"].strip()]
    return (f'{m["res"]} = "iree_linalg_ext.attention"({", ".join(operands)}) <{{{attrs}}}> '
            f'({{\n{m["body"]}{m["indent"]}}}) : ({", ".join(types)}) -> {m["res_type"]}')


def portable_asm(text: str) -> str:
    """Module text that every release in TABLE parses: attention ops in generic form."""
    return _ATTENTION.sub(_generic_attention, text)
