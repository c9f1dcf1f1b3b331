"""GGUF → transformers directories in the cache, made once per file: its metadata, or the whole model dequantised.

``ensure_metadata(path)`` returns ``<cache>/gguf-meta/<key>/``: the file's config.json and tokenizer, which take
seconds to parse out of the GGUF and milliseconds to read back (``specdec.models.gguf_load`` reads the weights from
the file itself). ``ensure_converted(path)`` returns ``<cache>/converted/<key>/``: the model dequantised to float32
safetensors (``--dtype float32``), a directory that ``from_pretrained`` reads in seconds. The key is the file's name, its size and a hash of its first and last MiB, so a changed file gets a
new directory. Conversion runs in a child process (the dequantised model is freed with it, so the caller's
peak memory does not carry it), writes into a temporary directory and renames it into place: a directory under
its final name is always complete. A lock file serialises concurrent conversions of the same file.

transformers' GGUF tokenizer conversion gets some special tokens wrong (SmolLM2: eos becomes ``<|im_start|>``
and a BOS is prepended although the file says not to), so the saved tokenizer takes bos/eos/unk/pad and
add_bos/add_eos from the GGUF metadata.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from specdec.models.paths import cache_dir

EDGE_BYTES = 1 << 20
# Marks a directory produced by this module; its content is the source's key.
MARKER = "specdec-gguf-source.txt"


def converted_root() -> Path:
    return cache_dir() / "converted"


def cache_key(path: Path) -> str:
    """``<stem>-<size>-<12 hex of sha256(first MiB + last MiB)>``: cheap, and changes when the file does."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return f"{path.name.removesuffix('.gguf')}-{size}-{h.hexdigest()[:12]}"


def converted_path(path: Path) -> Path:
    """Where ``path`` is (or would be) converted; it exists only once the conversion is complete."""
    return converted_root() / cache_key(path)


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the duration of the block (released if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_converted(path: Path, *, quiet: bool = False) -> Path:
    """The safetensors directory for the GGUF file ``path``, converting it first if the cache lacks it."""
    path = Path(path).expanduser().resolve()
    return _ensure(path, converted_path(path), lambda tmp: _convert_in_child(path, tmp, quiet=quiet))


def metadata_path(path: Path) -> Path:
    """Where the GGUF file's config and tokenizer are (or would be) cached."""
    return cache_dir() / "gguf-meta" / cache_key(path)


def ensure_metadata(path: Path) -> Path:
    """The directory holding the GGUF file's config.json and tokenizer, saving them first if the cache lacks it."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return _ensure(path, metadata_path(path), lambda tmp: save_metadata(path, tmp))


def _ensure(path: Path, final: Path, build) -> Path:
    """``final``, built by ``build(tmp)`` into a temporary directory renamed into place, unless it exists."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if final.is_dir():
        return final
    root = final.parent
    with file_lock(root / f".{final.name}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            build(tmp)
            (tmp / MARKER).write_text(f"{path}\n{final.name}\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _convert_in_child(src: Path, dst: Path, *, quiet: bool) -> None:
    if not quiet:
        print(f"specdec: converting {src.name} to safetensors (once) ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.models.gguf_convert", str(src), str(dst)],
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.PIPE,
    )
    tail = b""
    try:
        # Forward the child's progress bars as they come, and keep the end for an error message.
        while chunk := proc.stderr.read1(65536):
            if not quiet:
                _write_stderr(chunk)
            tail = (tail + chunk)[-8192:]
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        raise RuntimeError(f"converting {src} to safetensors failed (exit {proc.returncode}):\n" + "\n".join(lines))


def _write_stderr(chunk: bytes) -> None:
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is not None:
        buffer.write(chunk)
    else:
        sys.stderr.write(chunk.decode(errors="replace"))
    sys.stderr.flush()


def convert(src: Path, dst: Path) -> None:
    """Dequantise ``src`` (GGUF) and save model and tokenizer into the directory ``dst`` (float32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    save_metadata(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.save_pretrained(dst, safe_serialization=True)


def save_metadata(src: Path, dst: Path) -> None:
    """Save the GGUF file's tokenizer (special tokens as the file says) and config.json into the directory ``dst``."""
    from transformers import AutoConfig, AutoTokenizer

    src, dst = Path(src), Path(dst)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    _fix_special_tokens(tokenizer, src)
    tokenizer.save_pretrained(dst)
    AutoConfig.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(dst)


def gguf_special_tokens(src: Path) -> dict:
    """bos/eos/unk/pad ids and add_bos/add_eos flags from a GGUF file's tokenizer metadata (those present)."""
    from gguf import GGUFReader

    reader = GGUFReader(src)
    out = {}
    for key in ("bos", "eos", "unknown", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            out[key] = int(field.contents())
    for key in ("add_bos_token", "add_eos_token"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[key] = bool(field.contents())
    return out


def _fix_special_tokens(tokenizer, src: Path) -> None:
    meta = gguf_special_tokens(src)
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    for key, attr in names.items():
        if key in meta and 0 <= meta[key] < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(meta[key])
            if getattr(tokenizer, attr) != token:
                setattr(tokenizer, attr, token)
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in meta and hasattr(tokenizer, flag) and getattr(tokenizer, flag) != meta[flag]:
            try:
                setattr(tokenizer, flag, meta[flag])  # fast Llama tokenizers rebuild their post-processor
            except AttributeError:
                pass


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m specdec.models.gguf_convert SRC.gguf DST_DIR")
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
