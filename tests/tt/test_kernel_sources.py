"""Every device kernel preprocesses (g++ -E) against the ttnn wheel's kernel headers with the JIT's
include directories and macros, and calls only names those headers (or our own sources) declare.
Negative tests prove the check fails on a misspelt include, API header or API function.
Runs in the tt job; skipped where ttnn (the wheel's headers) is not installed.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

if importlib.util.find_spec("ttnn") is None:
    pytest.skip("ttnn is not installed (the tt job installs ttnn==0.81.1 in Python 3.12)", allow_module_level=True)
if shutil.which("g++") is None:
    pytest.skip("g++ not found", allow_module_level=True)

from specdec.tt import jit_check as jc  # noqa: E402

CASES = [(role, proc, arch) for role in jc.KERNELS for proc in jc.ROLE_PROCESSORS[role] for arch in jc.ARCHS]


@pytest.mark.parametrize("role,proc,arch", CASES)
def test_kernel_preprocesses_and_calls_only_declared_names(role, proc, arch):
    src = jc.KERNELS[role]
    pp = jc.preprocess(src, proc, arch)
    assert "kernel_main" in pp.text
    assert jc.undeclared_calls(src, pp) == []


@pytest.mark.parametrize("arch", list(jc.ARCHS))
@pytest.mark.parametrize("role,proc", [("reader", "ncrisc"), ("writer", "brisc")])
def test_dataflow_kernels_type_check_in_the_firmware_unit(role, proc, arch):
    jc.syntax_check(jc.KERNELS[role], proc, arch)


def _copy_tree(tmp_path: Path) -> Path:
    """A copy of csrc/tt/kernels (relative includes keep working)."""
    dst = tmp_path / "kernels"
    shutil.copytree(jc.KERNEL_DIR, dst)
    return dst


def test_misspelt_include_fails(tmp_path):
    k = _copy_tree(tmp_path) / "dataflow" / "reader.cpp"
    k.write_text(k.read_text().replace('"api/dataflow/dataflow_api.h"', '"api/dataflow/dataflow_apis.h"'))
    with pytest.raises(RuntimeError, match="dataflow_apis.h"):
        jc.preprocess(k, "ncrisc")


def test_misspelt_compute_api_header_fails(tmp_path):
    k = _copy_tree(tmp_path) / "compute" / "softmax_numerator.cpp"
    k.write_text(k.read_text().replace('"api/compute/eltwise_unary/exp.h"', '"api/compute/eltwise_unary/expo.h"'))
    for proc in jc.ROLE_PROCESSORS["compute"]:
        with pytest.raises(RuntimeError, match="expo.h"):
            jc.preprocess(k, proc)


def test_misspelt_api_function_is_reported(tmp_path):
    k = _copy_tree(tmp_path) / "dataflow" / "writer.cpp"
    k.write_text(k.read_text().replace("noc_semaphore_wait_min(", "noc_semaphore_wait_mn("))
    pp = jc.preprocess(k, "brisc")  # preprocessing alone cannot see this
    assert jc.undeclared_calls(k, pp) == ["noc_semaphore_wait_mn"]


def test_only_the_sfpi_toolchain_headers_are_stubbed(tmp_path):
    empty = tmp_path / "nostubs"
    empty.mkdir()
    with pytest.raises(RuntimeError) as exc:
        jc.preprocess(jc.KERNELS["compute"], "trisc1", stub_dir=empty)
    assert any(h in str(exc.value) for h in jc.SFPI_STUBS)
    # with the stubs, only SFPI headers are missing from the wheel: nothing else is stubbed
    assert jc.SFPI_STUBS == ("sfpi.h", "lltt.h")
    root = jc.ttnn_root()
    for h in jc.SFPI_STUBS:
        assert not list(root.rglob(h)), f"{h} ships in the wheel; it must not be stubbed"


def test_type_check_catches_wrong_api_use(tmp_path):
    tree = _copy_tree(tmp_path)
    w = tree / "dataflow" / "writer.cpp"
    w.write_text(w.read_text().replace("noc_async_write_page(b, out, get_write_ptr(CB_OUT));",
                                       "noc_async_write_page(out, b, get_write_ptr(CB_OUT));"))
    with pytest.raises(RuntimeError, match="noc_async_write_page"):
        jc.syntax_check(w, "brisc")
    r = tree / "dataflow" / "reader.cpp"
    r.write_text(r.read_text().replace("cb_reserve_back(CB_LOCALMAX, 1);", "cb_reserve_back(CB_LOCALMAX);"))
    with pytest.raises(RuntimeError, match="cb_reserve_back"):
        jc.syntax_check(r, "ncrisc")
