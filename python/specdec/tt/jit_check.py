"""Static checks of the device kernel sources against the ttnn wheel's kernel headers.

Without the SFPI RISC-V toolchain the kernels cannot be compiled here.  What can be checked is that
each source preprocesses (``g++ -E``) the way tt-metal's JIT build would see it: the same include
directories (taken from the wheel's layout), the JIT-defined macros for each RISC-V processor, and
stubs for the two headers that ship with the SFPI toolchain rather than the wheel (``sfpi.h`` and
``lltt.h``, compute kernels only).  A second check requires every function or macro the kernel
calls to be declared somewhere in the headers it includes, which catches a misspelt API name that
``-E`` alone would let through.

For the two data-movement kernels a third check goes further: ``syntax_check`` type-checks them
(``g++ -fsyntax-only``) inside the firmware entry file the JIT compiles them with (brisck.cc /
ncrisck.cc), so wrong argument types or counts against the real dataflow API fail here too.  The
compute kernel cannot be type-checked without the SFPI compiler's vector types.

This module imports neither ttnn nor numpy; it only locates the installed ttnn package.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parents[3] / "csrc" / "tt" / "kernels"
KERNELS = {
    "reader": KERNEL_DIR / "dataflow" / "reader.cpp",
    "writer": KERNEL_DIR / "dataflow" / "writer.cpp",
    "compute": KERNEL_DIR / "compute" / "softmax_numerator.cpp",
}
ARCHS = {
    # name: (hw/inc/internal subdir, defines subdir, ckernels dir, tt-llk dir, ARCH macro)
    "wormhole_b0": ("tt-1xx/wormhole", "wormhole_b0_defines", "wormhole_b0", "tt_llk_wormhole_b0", "ARCH_WORMHOLE"),
    "blackhole": ("tt-1xx/blackhole", "blackhole_defines", "blackhole", "tt_llk_blackhole", "ARCH_BLACKHOLE"),
}
# (processor macro set) per kernel role; the reader runs on NCRISC, the writer on BRISC.
PROCESSORS = {
    "brisc": ["COMPILE_FOR_BRISC", "PROCESSOR_INDEX=0"],
    "ncrisc": ["COMPILE_FOR_NCRISC", "PROCESSOR_INDEX=1"],
    "trisc0": ["COMPILE_FOR_TRISC=0", "UCK_CHLKC_UNPACK", "TRISC_UNPACK", "NAMESPACE=chlkc_unpack", "PROCESSOR_INDEX=2"],
    "trisc1": ["COMPILE_FOR_TRISC=1", "UCK_CHLKC_MATH", "TRISC_MATH", "NAMESPACE=chlkc_math", "PROCESSOR_INDEX=3"],
    "trisc2": ["COMPILE_FOR_TRISC=2", "UCK_CHLKC_PACK", "TRISC_PACK", "NAMESPACE=chlkc_pack", "PROCESSOR_INDEX=4"],
}
ROLE_PROCESSORS = {"reader": ["ncrisc"], "writer": ["brisc"], "compute": ["trisc0", "trisc1", "trisc2"]}
SFPI_STUBS = ("sfpi.h", "lltt.h")


def ttnn_root() -> Path:
    """The installed ttnn package directory (holds tt_metal/ and ttnn/cpp); not imported."""
    spec = importlib.util.find_spec("ttnn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ttnn is not installed (pip install ttnn==0.81.1 in a Python 3.12 venv)")
    return Path(list(spec.submodule_search_locations)[0])


def include_dirs(root: Path, arch: str, compute: bool) -> list[Path]:
    inc, dfn, ck, llk, _ = ARCHS[arch]
    tm = root / "tt_metal"
    dirs = [
        root,
        tm,
        tm / "hw" / "inc",
        tm / "hw" / "inc" / "internal" / "tt-1xx",
        tm / "hw" / "inc" / "internal" / inc,
        tm / "hw" / "inc" / "internal" / inc / dfn,
        tm / "hw" / "inc" / "internal" / inc / "noc",
        tm / "hw" / "ckernels" / ck / "metal" / "common",
        tm / "hw" / "ckernels" / ck / "metal" / "llk_io",
        tm / "tt-llk" / llk / "common" / "inc",
        tm / "tt-llk" / llk / "llk_lib",
        tm / "tt-llk" / "common",
        tm / "tt-llk" / "tools" / "include",
        tm / "hw" / "firmware" / "src" / "tt-1xx",
        tm / "hostdevcommon" / "api",
        tm / "api",
    ]
    if compute:
        dirs += [
            tm / "hw" / "ckernels" / ck / "metal" / "llk_api",
            tm / "hw" / "ckernels" / ck / "metal" / "llk_api" / "llk_sfpu",
        ]
    return dirs


def jit_defines(arch: str, processor: str, compile_time_args: list[int]) -> list[str]:
    d = [ARCHS[arch][4], "TENSIX_FIRMWARE", "LOCAL_MEM_EN=0", "KERNEL_BUILD", "NOC_INDEX=0", "NOC_MODE=0",
         "DISPATCH_MESSAGE_ADDR=0", "NUM_DRAM_BANKS=12", "LOG_BASE_2_OF_NUM_DRAM_BANKS=4",
         "IS_NOT_POW2_NUM_DRAM_BANKS=1", "NUM_L1_BANKS=64", "LOG_BASE_2_OF_NUM_L1_BANKS=6",
         "PCIE_NOC_X=0", "PCIE_NOC_Y=3", "PROGRAMMABLE_CORE_TYPE=0",
         "KERNEL_COMPILE_TIME_ARGS=" + ",".join(str(a) for a in compile_time_args)]
    return d + PROCESSORS[processor]


@dataclass
class Preprocessed:
    kernel: str
    processor: str
    arch: str
    text: str  # preprocessor output with line markers and #defines kept (-dD)


def preprocess(source: Path, processor: str, arch: str = "wormhole_b0", compile_time_args=(0, 0),
               root: Path | None = None, stub_dir: Path | None = None, gxx: str = "g++") -> Preprocessed:
    """Run ``g++ -E`` as the JIT would include the kernel; raises RuntimeError with the diagnostics."""
    root = root or ttnn_root()
    compute = processor.startswith("trisc")
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(stub_dir) if stub_dir else Path(tmp)
        if compute and stub_dir is None:
            for name in SFPI_STUBS:  # from the SFPI toolchain, absent here; the only stubs used
                (stubs / name).write_text("#pragma once\n// stub: SFPI toolchain header (preprocessing check only)\n")
        cmd = [gxx, "-std=c++17", "-E", "-dD"]
        cmd += [f"-D{d}" for d in jit_defines(arch, processor, list(compile_time_args))]
        cmd += [f"-I{p}" for p in include_dirs(root, arch, compute)]
        if compute:
            cmd.append(f"-I{stubs}")
        cmd.append(str(source))
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"g++ -E failed for {source.name} ({processor}, {arch}):\n{r.stderr[-4000:]}")
    return Preprocessed(source.name, processor, arch, r.stdout)


_KEYWORDS = {
    "if", "for", "while", "switch", "return", "sizeof", "static_assert", "reinterpret_cast", "static_cast",
    "const_cast", "decltype", "alignof", "defined", "__builtin_LINE",
}
_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*(?:<[^;(){}<>]*(?:<[^;(){}<>]*>[^;(){}<>]*)*>)?\s*\(")


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def own_sources() -> list[Path]:
    return [KERNEL_DIR / "specdec_tt_algo.hpp", *KERNELS.values()]


def called_names(source: Path) -> set[str]:
    return {m.group(1) for m in _CALL.finditer(_strip_comments(source.read_text()))} - _KEYWORDS


_DEF = re.compile(r"\b([A-Za-z_]\w*)\s*\([^;{}()]*(?:\([^;{}()]*\)[^;{}()]*)*\)\s*(?:const\s*)?\{")
_LOCAL = re.compile(r"\b(?:auto|Load)\s+([A-Za-z_]\w*)\s*(?:=|,|\))")


def own_declarations() -> set[str]:
    """Functions defined, and callables bound to local names, in our own kernel sources."""
    names: set[str] = set()
    for p in own_sources():
        src = _strip_comments(p.read_text())
        names |= {m.group(1) for m in _DEF.finditer(src)} | {m.group(1) for m in _LOCAL.finditer(src)}
        names |= set(re.findall(r"\bstruct\s+(\w+)", src))
    return names - _KEYWORDS


def _kernel_tree(source: Path) -> Path:
    """The kernels directory a source belongs to (the one holding specdec_tt_algo.hpp)."""
    for parent in Path(source).resolve().parents:
        if (parent / "specdec_tt_algo.hpp").exists():
            return parent
    return Path(source).resolve().parent


def header_text(pp: Preprocessed, source: Path | None = None) -> str:
    """The part of the preprocessor output that comes from the wheel's headers, not from our sources."""
    trees = {KERNEL_DIR.resolve()}
    if source is not None:
        trees.add(_kernel_tree(source))
    out, keep = [], True
    for line in pp.text.splitlines():
        if line.startswith("# ") and '"' in line:
            fname = line.split('"')[1]
            try:
                path = Path(fname).resolve()
                keep = not any(t == path or t in path.parents for t in trees)
            except OSError:
                keep = True
            continue
        if keep:
            out.append(line)
    return "\n".join(out)


def undeclared_calls(source: Path, pp: Preprocessed) -> list[str]:
    """Names the kernel calls that neither the wheel headers nor our own sources declare."""
    text = header_text(pp, source)
    own = own_declarations()
    missing = []
    for name in sorted(called_names(source)):
        if re.search(rf"\b{name}\b", text):
            continue
        if name in own:
            continue
        missing.append(name)
    return missing


def check_all(arch: str = "wormhole_b0", root: Path | None = None) -> dict[str, list[str]]:
    """Preprocess every kernel for every processor it runs on; returns {kernel/processor: missing}."""
    report = {}
    for role, src in KERNELS.items():
        for proc in ROLE_PROCESSORS[role]:
            pp = preprocess(src, proc, arch, compile_time_args=CT_ARGS[role], root=root)
            report[f"{role}/{proc}"] = undeclared_calls(src, pp)
    return report


# Realistic compile-time args: TensorAccessorArgs of an interleaved DRAM tensor are
# [ArgConfig::IsDram (2), aligned page size].
CT_ARGS = {
    "reader": [0, 1, 2048, 2, 2048, 2, 64, 2, 4096],  # bf16 logits, draft probs, then logits/params/q
    "writer": [1, 63, 2, 64],  # draft probs, 63 workers, output accessor
    "compute": [],
}
FIRMWARE = {"brisc": "brisck.cc", "ncrisc": "ncrisck.cc"}


def syntax_check(source: Path, processor: str, arch: str = "wormhole_b0", compile_time_args=None,
                 root: Path | None = None, gxx: str = "g++") -> None:
    """Type-check a dataflow kernel as tt-metal's JIT compiles it: the firmware entry file
    (brisck.cc / ncrisck.cc) including the kernel through a generated kernel_includes.hpp, with
    ``g++ -fsyntax-only``.  Raises RuntimeError with the diagnostics."""
    root = root or ttnn_root()
    if processor not in FIRMWARE:
        raise ValueError("syntax_check covers the data-movement kernels (brisc, ncrisc)")
    if compile_time_args is None:
        compile_time_args = CT_ARGS["writer" if processor == "brisc" else "reader"]
    fw = root / "tt_metal" / "hw" / "firmware" / "src" / "tt-1xx" / FIRMWARE[processor]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel_includes.hpp").write_text(f'#include "{Path(source).resolve()}"\n')
        # The device is 32-bit; the host compiler is not (and has no 32-bit multilib here), so the
        # firmware's pointer-to-uint32_t casts are "-fpermissive" errors.  Downgrade those, then
        # refuse any such diagnostic located in our own sources.
        cmd = [gxx, "-std=c++17", "-fsyntax-only", "-fpermissive", "-Wno-attributes"]
        cmd += [f"-D{d}" for d in jit_defines(arch, processor, list(compile_time_args))]
        cmd += [f"-I{tmp}"] + [f"-I{p}" for p in include_dirs(root, arch, False)]
        cmd.append(str(fw))
        r = subprocess.run(cmd, capture_output=True, text=True)
    tree = _kernel_tree(source)
    own_diag = [ln for ln in r.stderr.splitlines()
                if ("error" in ln or "fpermissive" in ln) and str(tree) in ln.split(":")[0]]
    if r.returncode != 0 or own_diag:
        errs = "\n".join([ln for ln in r.stderr.splitlines() if "error" in ln] + own_diag)
        raise RuntimeError(f"g++ -fsyntax-only failed for {Path(source).name} ({processor}, {arch}):\n{errs[-4000:]}")


if __name__ == "__main__":  # python -m specdec.tt.jit_check
    import sys

    bad = False
    for arch in ARCHS:
        for key, missing in check_all(arch).items():
            status = "g++ -E ok, API names ok" if not missing else "undeclared: " + ", ".join(missing)
            bad |= bool(missing)
            print(f"{arch:12s} {key:16s} {status}")
        for role, proc in (("reader", "ncrisc"), ("writer", "brisc")):
            try:
                syntax_check(KERNELS[role], proc, arch)
                print(f"{arch:12s} {role + '/' + proc:16s} g++ -fsyntax-only in {FIRMWARE[proc]} ok")
            except RuntimeError as exc:
                bad = True
                print(f"{arch:12s} {role + '/' + proc:16s} {exc}")
    sys.exit(1 if bad else 0)
