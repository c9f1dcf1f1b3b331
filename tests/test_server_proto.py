"""The committed stubs under python/specdec/v1/ are exactly what `make proto` generates from the proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

from specdec.v1 import specdec_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("specdec_pb2.py", "specdec_pb2_grpc.py", "specdec_pb2.pyi")


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    # the same command as `make proto`, writing into a scratch directory
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    out = tmp_path / "out"
    out.mkdir()
    args = ["protoc", f"-I{tmp_path / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}",
            str(tmp_path / "proto/specdec/v1/specdec.proto")]  # fmt: skip
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (out / "specdec/v1" / name).read_text()
        committed = (REPO / "python/specdec/v1" / name).read_text()
        assert committed == fresh, f"python/specdec/v1/{name} is stale: run `make proto` and commit the result"


def test_api_conventions():
    """Enum zero values are *_UNSPECIFIED and every sampling/speculation number is `optional` (unset != 0)."""
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
    for msg in ("SamplingOptions", "SpeculationOptions"):
        for f in pb.DESCRIPTOR.message_types_by_name[msg].fields:
            if f.type != f.TYPE_ENUM and f.type != f.TYPE_BOOL:
                assert f.has_presence, f"{msg}.{f.name} must be optional"
    service = pb.DESCRIPTOR.services_by_name["SpecDecode"]
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "Benchmark", "GetModelInfo"}
