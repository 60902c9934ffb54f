"""Artifact conventions shared by every stage: atomic files, hashes, manifests, up-to-date checks.

A stage's folder is complete only when its `manifest.json` exists: the manifest is written last and
lists every output with its sha256, the hash of the config sections the stage reads, and the
fingerprints of its inputs. A rerun with the same config and inputs whose outputs still match is
skipped; anything else reruns (resuming from the stage's own checkpoint when there is one).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temp path in the same folder; on success fsync it and os.replace it onto `path`.

    A crash, a kill or a full disk leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every OS (Windows); the file itself is already synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def torch_save(obj, path) -> None:
    """torch.save to a temp file then os.replace: a checkpoint is either old or new, never torn."""
    import torch

    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(obj, tmp)


def torch_load(path, map_location="cpu"):
    """Load a checkpoint written by torch_save. weights_only=True: tensors and plain values only."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def save_figure(fig, path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def tree_stamps(root) -> dict[str, list]:
    """{relative path: [size, mtime_ns, inode, ctime_ns]} of every file under root (dot files left out), in a
    fixed walk order: what decides whether a cached hash still holds. Only stat calls: cheap next to hashing."""
    root = Path(root)
    stamps = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            st = p.stat()
            stamps[p.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    return stamps


def read_hash_cache(cache_file) -> dict:
    """fingerprint_tree's cache ({relative path: [stamp, sha256]}); {} when absent or unreadable."""
    if cache_file is None or not Path(cache_file).exists():
        return {}
    try:
        return read_json(cache_file)
    except (OSError, ValueError):
        return {}


def stale_files(stamps: dict, cache: dict) -> list[str]:
    """The files (relative paths, walk order) whose hash the cache does not hold for their current stamp."""
    return [rel for rel, stamp in stamps.items() if not (cache.get(rel) and cache[rel][0] == stamp)]


def fingerprint_from(stamps: dict, cache: dict, digests: dict, cache_file=None) -> str:
    """The fingerprint from the cached hashes plus the new `digests` of the stale files; with cache_file, the
    hashes are saved there when they changed."""
    fresh, h = {}, hashlib.sha256()
    for rel, stamp in stamps.items():
        digest = digests[rel] if rel in digests else cache[rel][1]
        fresh[rel] = [stamp, digest]
        h.update(f"{rel}\0{digest}\n".encode())
    if cache_file is not None and fresh != cache:
        write_json(cache_file, fresh)
    return h.hexdigest()


def fingerprint_tree(root, cache_file=None, write_cache: bool = True) -> str:
    """Fingerprint of a folder's content: relative path and sha256 of every file under it.

    Content, not mtimes: `cp -p`, `rsync -t` or `tar` can change a file and keep its size and mtime. Each file
    is hashed once; with `cache_file` the hashes are reused while path, size, mtime, inode and ctime all stay the
    same (a rewrite in place changes the ctime), so reruns stay fast. write_cache=False reads the cache but
    never writes it. Under DDP, data.py splits the hashing of the stale files over the ranks with the same
    three steps (tree_stamps, stale_files, fingerprint_from).
    """
    root = Path(root)
    stamps = tree_stamps(root)
    cache = read_hash_cache(cache_file)
    digests = {rel: sha256_file(root / rel) for rel in stale_files(stamps, cache)}
    return fingerprint_from(stamps, cache, digests, cache_file if write_cache else None)


def package_versions(names=("torch", "torchvision", "timm", "torch-pruning", "onnx", "onnxruntime",
                            "onnxruntime-gpu", "bentoml", "numpy", "pillow")) -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def manifest_is_current(stage_dir, config_hash: str, inputs: dict) -> bool:
    """True when the stage finished before with this config and these inputs, outputs intact."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return False
    try:
        m = read_json(path)
    except (OSError, ValueError):
        return False
    if m.get("config_hash") != config_hash or m.get("inputs") != inputs:
        return False
    for name, digest in m.get("outputs", {}).items():
        f = Path(stage_dir) / name
        if not f.exists() or sha256_file(f) != digest:
            return False
    return True


def write_manifest(stage_dir, stage: str, config_hash: str, inputs: dict, outputs: list[str],
                   timings: dict, extra: dict | None = None) -> dict:
    """Write manifest.json last: its presence marks the stage as complete."""
    stage_dir = Path(stage_dir)
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "inputs": inputs,
        "outputs": {name: sha256_file(stage_dir / name) for name in sorted(outputs)},
        "versions": package_versions(),
        "timings": timings,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def invalidate(stage_dir) -> None:
    """Remove a stage's manifest before it starts writing, so a crash never leaves a stale 'done'."""
    path = Path(stage_dir) / MANIFEST
    if path.exists():
        path.unlink()
