"""The `specdec` command line: generate and health against a real server, parsing, models list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import server  # noqa: F401 - fixture

from specdec import cli
from specdec.v1 import specdec_pb2 as pb

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "specdec.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_generate_streams_text_then_a_stats_line(server):
    expected = server.stub().Generate(pb.GenerateRequest(text="def add(a, b):", max_new_tokens=12, ignore_eos=True), timeout=30)
    p = run_cli("generate", "def add(a, b):", "--address", server.address, "--max-new-tokens", "12", "--ignore-eos")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected.text + "\n"
    assert "[12 tokens in" in p.stderr and "acceptance" in p.stderr and "finish length" in p.stderr


def test_generate_json_and_errors(server):
    p = run_cli("generate", "hello", "--address", server.address, "--max-new-tokens", "3", "--seed", "5",
                "--temperature", "0.7", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["token_ids"]) == 3 and out["summary"]["seed"] == "5"  # uint64 is a string in proto JSON
    bad = run_cli("generate", "hello", "--address", server.address, "--top-p", "1.5")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p must be in (0, 1], got 1.5" in bad.stderr


def test_health_command(server, tmp_path):
    assert cli.main(["health", "--address", server.address]) == 0
    assert cli.main(["health", "--address", "127.0.0.1:1", "--timeout", "1"]) == 1


def test_serve_flags_of_the_issue_exist():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--target", "--draft", "--method", "--gamma", "--gamma-max", "--dtype", "--draft-dtype", "--port",
                 "--metrics-port", "--threads", "--max-queue", "--host", "--log-level", "--grace"):  # fmt: skip
        assert flag in help_text
    gen = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--json", "--address"):
        assert flag in gen
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--gamma", "2", "--gamma-max", "4"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--method", "magic"])


def test_serve_rejects_bad_values_before_loading(capsys):
    assert cli.main(["serve", "--target", "x", "--gamma", "40"]) == 2
    assert "--gamma must be in [0, 32], got 40" in capsys.readouterr().err
    assert cli.main(["serve", "--target", "x", "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk must be >= 0 (0: the whole prompt in one forward), got -1" in capsys.readouterr().err
    assert cli.main(["serve", "--draft", "d"]) == 2


def test_models_list_reads_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert cli.main(["models", "list", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert {m["role"] for m in models} >= {"target", "draft"}
    assert all(m["state"] == "missing" for m in models)
    assert cli.main(["models", "fetch", "nonsense"]) == 2
