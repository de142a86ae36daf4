"""The published COCO Mask R-CNN checkpoints, as data, and a verified downloader.

    from jaxmrcnn import zoo
    zoo.list()                                   # the catalogue entries (dicts)
    path = zoo.resolve("detectron2/mask_rcnn_R_50_FPN_3x")   # -> Path of the verified file

`catalogue.json` (next to this file) holds one entry per checkpoint: name, framework, url,
filename, size (bytes, or null where the framework publishes none), sha256 (full digest, null
where unpublished), hash_prefix + hash_prefix_algorithm (torchvision and mmdet put the first hex
digits of the file's SHA-256 in its name), box_ap / mask_ap, preset (a jaxmrcnn.config.PRESETS
name for the architecture, or null), direct_download, and citations (repo, file, lines) for every
figure. Nothing in it is guessed: a figure the source does not publish is null.

resolve() downloads into `<cache>/zoo/<name>/<filename>` (cache: $JAXMRCNN_CACHE_DIR or
~/.cache/jaxmrcnn, as jaxmrcnn.detector._cache_root, or `cache_dir=`), streaming into a `.part`
file that later calls resume with an HTTP Range request. The file is moved into place (os.replace)
only after its size and checksum match the catalogue (full SHA-256 when published, else the
published prefix); a mismatch deletes the partial file. A verified file is reused without
re-downloading; a `.verified` note beside it (size, mtime, sha256) spares re-hashing it.

$JAXMRCNN_ZOO_MIRROR=<base URL> fetches from a mirror instead: the catalogue URL's path (and query)
is appended to the base, e.g. https://mirror.example/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import difflib
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path

from jaxmrcnn.detector import _cache_root

__all__ = ["ZooError", "ChecksumError", "list", "get", "names", "resolve", "cached_path",
           "download_url", "MIRROR_ENV"]

MIRROR_ENV = "JAXMRCNN_ZOO_MIRROR"
CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
_CHUNK = 1 << 20
_USER_AGENT = "jaxmrcnn-zoo/1 (+urllib)"


class ZooError(RuntimeError):
    """A zoo checkpoint could not be provided (unknown name, download failed, offline...)."""


class ChecksumError(ZooError):
    """The downloaded bytes do not match the catalogue's size or checksum (the file was deleted)."""


# ------------------------------------------------------------------------------------ catalogue


@lru_cache(maxsize=1)
def _load_catalogue() -> tuple:
    with open(CATALOGUE_PATH, encoding="utf-8") as f:
        doc = json.load(f)
    return tuple(doc["entries"])


def _catalogue() -> tuple:
    """The entries (tests replace this function to serve a small catalogue)."""
    return _load_catalogue()


def list() -> builtins.list[dict]:  # noqa: A001 - the brief's name; builtins.list used inside
    """Every catalogue entry, as a fresh list of dicts (copies: editing them changes nothing)."""
    return [copy.deepcopy(e) for e in _catalogue()]


def names() -> builtins.list[str]:
    return [e["name"] for e in _catalogue()]


def get(name: str) -> dict:
    """The catalogue entry called `name` (a copy); ZooError with close matches when unknown."""
    for e in _catalogue():
        if e["name"] == name:
            return copy.deepcopy(e)
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ZooError(f"{name!r} is not in the jaxmrcnn zoo catalogue ({CATALOGUE_PATH}).{hint} "
                   "jaxmrcnn.zoo.list() shows the names.")


def is_known(name: str) -> bool:
    return any(e["name"] == name for e in _catalogue())


# ---------------------------------------------------------------------------------- cache paths


def _zoo_dir(cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    if root is None:
        raise ZooError("no cache directory for zoo downloads (no home directory): set "
                       "JAXMRCNN_CACHE_DIR or pass cache_dir=")
    return root / "zoo"


def cached_path(name: str, *, cache_dir=None) -> Path:
    """Where resolve(name) keeps the file (it may not exist yet)."""
    e = get(name)
    return _zoo_dir(cache_dir).joinpath(*e["name"].split("/")) / e["filename"]


def _download_url(entry: dict) -> str:
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return entry["url"]
    parts = urllib.parse.urlsplit(entry["url"])
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return mirror.rstrip("/") + tail


# ---------------------------------------------------------------------------------- verification


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check(entry: dict, path: Path, digest: str) -> str | None:
    """None when `path` (whose sha256 is `digest`) matches the entry; else what is wrong."""
    size = path.stat().st_size
    if entry.get("size") is not None and size != int(entry["size"]):
        return f"size {size} bytes, the catalogue says {entry['size']}"
    if entry.get("sha256"):
        if digest != entry["sha256"].lower():
            return f"sha256 {digest}, the catalogue says {entry['sha256']}"
    elif entry.get("hash_prefix"):
        algo = entry.get("hash_prefix_algorithm") or "sha256"
        if algo != "sha256":  # every prefix in the catalogue is a SHA-256 one
            raise ZooError(f"{entry['name']}: unsupported hash_prefix_algorithm {algo!r}")
        if not digest.startswith(entry["hash_prefix"].lower()):
            return (f"sha256 {digest} does not start with the published prefix "
                    f"{entry['hash_prefix']}")
    return None


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_note(path: Path, digest: str) -> None:
    st = path.stat()
    note = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    tmp = _note_path(path).with_name(_note_path(path).name + ".tmp")
    tmp.write_text(json.dumps(note))
    os.replace(tmp, _note_path(path))


def _cached_ok(entry: dict, path: Path) -> bool:
    """True when `path` holds the entry's verified file (re-hashes it unless its note matches)."""
    if not path.is_file():
        return False
    st = path.stat()
    try:
        note = json.loads(_note_path(path).read_text())
        if note["size"] == st.st_size and note["mtime_ns"] == st.st_mtime_ns:
            return _check(entry, path, note["sha256"]) is None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _sha256(path)
    if _check(entry, path, digest) is not None:
        return False
    _write_note(path, digest)
    return True


# ------------------------------------------------------------------------------------- download


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock beside `path`, so two processes do not append to one .part file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _offline_help(entry: dict, dest: Path) -> str:
    return (f"To use a copy you already have, pass its path instead of the name (e.g. "
            f"jaxmrcnn.load('/path/to/{entry['filename']}')), or put the file at {dest} "
            f"(it is checked against the catalogue), or set {MIRROR_ENV} to a mirror serving "
            f"the same paths.")


class _Cut(Exception):
    """The connection ended before the whole file arrived (bytes may have been received)."""


def _fetch_once(url: str, part: Path, total_hint: int | None, timeout: float, bar) -> int | None:
    """One request, appending to `part` from its current size. Returns the expected total size
    when known. Raises _Cut when the transfer stopped early, urllib errors when it never began."""
    have = part.stat().st_size if part.exists() else 0
    if total_hint is not None and have > total_hint:  # longer than the file can be: start over
        part.unlink()
        have = 0
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT,
                                               "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the .part may already be whole
            e.close()
            return have if total_hint in (None, have) else total_hint
        raise
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if status == 206:
            crange = resp.headers.get("Content-Range", "")
            try:
                start = int(crange.split()[1].split("-")[0])
                total = crange.rsplit("/", 1)[1]
                total = int(total) if total.isdigit() else None
            except (IndexError, ValueError):
                start, total = -1, None
            if start != have:
                raise _Cut(f"server answered the range request for byte {have} with {crange!r}")
            mode = "ab"
        else:  # 200: the whole file (the server ignored Range)
            have, total, mode = 0, length, "wb"
        if total is None and length is not None:
            total = have + length
        total = total if total is not None else total_hint
        if bar is not None:
            bar.reset(total=total)
            bar.update(have)
        got = have
        with open(part, mode) as out:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
                    out.flush()
                    raise _Cut(f"connection lost after {got} bytes ({e!r})") from e
                if not block:
                    break
                out.write(block)
                got += len(block)
                if bar is not None:
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and got < total:
            raise _Cut(f"connection closed after {got} of {total} bytes")
        return total if total is not None else got


def download_url(entry: dict, dest: Path, *, progress: bool = True, timeout: float = 60.0,
                 retries: int = 5) -> Path:
    """Download entry's file to `dest` via `dest.part` (resuming it), verify, move into place."""
    url = _download_url(entry)
    part = dest.with_name(dest.name + ".part")
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=entry.get("size"), unit="B", unit_scale=True, unit_divisor=1024,
                       desc=entry["filename"], leave=True)
        except ImportError:
            bar = None
    stalls = 0
    try:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _fetch_once(url, part, entry.get("size"), timeout, bar)
                break
            except _Cut as e:
                after = part.stat().st_size if part.exists() else 0
                stalls = 0 if after > before else stalls + 1
                if stalls > retries:
                    raise ZooError(
                        f"downloading {entry['name']} from {url} keeps failing ({e}); "
                        f"{after} bytes are kept in {part} and the next call resumes from there. "
                        + _offline_help(entry, dest)) from None
                time.sleep(min(0.2 * 2 ** stalls, 5.0))
            except urllib.error.HTTPError as e:
                raise ZooError(f"could not download {entry['name']}: {url} answered HTTP {e.code} "
                               f"{e.reason}. " + _offline_help(entry, dest)) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                raise ZooError(f"could not download {entry['name']} from {url} (offline or "
                               f"unreachable: {reason}). " + _offline_help(entry, dest)) from None
    finally:
        if bar is not None:
            bar.close()
    digest = _sha256(part)
    problem = _check(entry, part, digest)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"the file downloaded from {url} for {entry['name']} is not the "
                            f"published one ({problem}); the partial file {part} was deleted. "
                            "Try again; if it persists the server or mirror serves other bytes.")
    os.replace(part, dest)
    _write_note(dest, digest)
    return dest


def resolve(name: str, *, cache_dir=None, progress: bool = True, timeout: float = 60.0,
            retries: int = 5) -> Path:
    """The local path of zoo checkpoint `name`, downloading and verifying it when needed.

    A cached file is re-used when it still matches the catalogue (no request is made). Raises
    ZooError (offline, HTTP error, not directly downloadable) or ChecksumError (the partial file
    is deleted). Nothing half-written is returned: only a verified file is moved into place.
    """
    entry = get(name)
    dest = cached_path(name, cache_dir=cache_dir)
    if _cached_ok(entry, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if _cached_ok(entry, dest):  # another process finished it while we waited
            return dest
        if dest.exists():  # present but not the published file: move it aside, never use it
            bad = dest.with_name(dest.name + ".rejected")
            os.replace(dest, bad)
            _note_path(dest).unlink(missing_ok=True)
            if not entry.get("direct_download", True):
                raise ChecksumError(f"{dest} does not match the catalogue entry {name}; moved it "
                                    f"to {bad}.")
        if not entry.get("direct_download", True):
            raise ZooError(
                f"{name} cannot be downloaded automatically: its published address {entry['url']} "
                f"is not a direct file link ({entry.get('notes', '')}). Download "
                f"{entry['filename']} from there by hand and pass its path instead of the name, "
                f"or put it at {dest}.")
        return download_url(entry, dest, progress=progress, timeout=timeout, retries=retries)
