"""Fetching and checking the official files: a download goes to a temp file in `root`, is checked
against the published MD5 and only then renamed into place, so `root` never holds a partial or
corrupt file under an official name."""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from d2r.data.sources import FILE_SETS, DatasetInfo, RemoteFile, fix_hint, info
from d2r.files import check_writable, describe, follow_umask

_CHUNK = 1 << 20
# Failures of the disk, not of a mirror: no other mirror can help, so they stop at once.
_LOCAL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks (about 0.3 s for a 170 MB archive)."""
    digest = hashlib.md5(usedforsecurity=False)  # a published checksum, not a security boundary
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def split_files(spec: DatasetInfo, split: str) -> list[RemoteFile]:
    return [remote for remote in spec.files if split in remote.splits]


def require(name: str, root: str | Path, split: str) -> list[Path]:
    """Paths of the files `split` needs; FileNotFoundError naming file, URL and place otherwise.

    Cheap (no reading), so a training run calls it before any work."""
    root = Path(root).expanduser()
    paths: list[Path] = []
    if name in FILE_SETS:  # a user's own files: data/own.py checks them
        return paths
    for remote in split_files(info(name), split):
        path = root / remote.filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{name}: {path} is missing. Download {remote.urls[0]} (MD5 {remote.md5}) and "
                f"put it, unextracted, in {root}; or run {fix_hint(name, root)}."
            )
        paths.append(path)
    return paths


def checksum_error(path: Path, remote: RemoteFile, actual: str, name: str) -> ValueError:
    size = path.stat().st_size if path.exists() else 0
    truncated = f" ({size:,} bytes, official {remote.size:,}: truncated?)"
    return ValueError(
        f"{path}: MD5 {actual} does not match the official {remote.md5}"
        f"{truncated if size < remote.size else ''}. The file is corrupt, truncated or another "
        f"version, so nothing was read from it. Delete it and run {fix_hint(name, path.parent)}; "
        "or, for your own subset or mirror in the official layout, load with verify=False "
        "(CLI: --set data.verify=false)."
    )


def verify_file(path: Path, remote: RemoteFile, name: str, verify: bool = True) -> str:
    """The file's MD5, after checking it against the published one.

    A mismatch is a ValueError, or with `verify=False` a warning (a user's own subset)."""
    actual = md5sum(path)
    if actual != remote.md5:
        if verify:
            raise checksum_error(path, remote, actual, name)
        warnings.warn(
            f"{path}: MD5 {actual} differs from the official {remote.md5}; loading it anyway "
            f"because verify=False. Results on it are not comparable with the official {name}.",
            stacklevel=3,
        )
    return actual


def _fetch(url: str, temp: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(temp, "wb") as file:
        shutil.copyfileobj(response, file, _CHUNK)


def _fetch_one(url: str, remote: RemoteFile, root: Path) -> Path:
    """Downloads `url` into a temp file next to the target, verifies it, then renames it."""
    handle, temp = tempfile.mkstemp(dir=root, prefix=f".{remote.filename}.", suffix=".part")
    os.close(handle)
    try:
        follow_umask(temp)  # the data root is often shared: the file gets the umask's mode
        _fetch(url, Path(temp))
        actual = md5sum(temp)
        if actual != remote.md5:
            size = Path(temp).stat().st_size
            raise ValueError(
                f"{url} served {size:,} bytes with MD5 {actual}, expected {remote.md5} "
                f"({remote.size:,} bytes); the download was deleted"
            )
        target = root / remote.filename
        os.replace(temp, target)  # atomic: the official name only ever holds a verified file
        return target
    finally:
        Path(temp).unlink(missing_ok=True)


def _fetch_verified(remote: RemoteFile, root: Path, name: str) -> Path:
    """The first mirror that yields a verified file; otherwise an error listing every attempt."""
    errors: list[tuple[str, Exception]] = []
    for url in remote.urls:
        try:
            return _fetch_one(url, remote, root)
        except OSError as error:
            if error.errno in _LOCAL:
                raise OSError(
                    f"{name}: cannot write {root / remote.filename} "
                    f"({remote.size / 1e6:,.0f} MB): {describe(error, path=False)} (--root)"
                ) from None
            errors.append((url, error))
        except (http.client.HTTPException, ValueError) as error:  # a cut connection, a bad file
            errors.append((url, error))
    # A wrong checksum is a data problem (ValueError); only unreachable mirrors are an OSError.
    kind = ValueError if any(type(e) is ValueError for _, e in errors) else OSError
    raise kind(
        f"{name}: could not fetch a verified {root / remote.filename}:\n  "
        + "\n  ".join(_reason(url, e) for url, e in errors)
        + f".\nCheck the network and retry, or download {remote.urls[0]} by hand, check its MD5 "
        f"is {remote.md5} and put it in {root}."
    )


def _reason(url: str, error: Exception) -> str:
    if isinstance(error, ValueError):
        return str(error)  # names the URL already
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return f"{url}: {error.reason}"  # not '<urlopen error ...>'
    return f"{url}: {error or type(error).__name__}"


def download(name: str, root: str | Path) -> list[Path]:
    """Fetches the official files of data set `name` into `root` and checks their published MD5.

    Files already present with the right checksum are kept. Returns the files' paths. When no
    mirror yields a verified file: ValueError if one served a wrong checksum, else OSError, each
    naming the URLs and the manual fix; nothing unverified is left in `root`. A `root` that
    cannot be written is a ValueError before any download."""
    if name in FILE_SETS:
        raise ValueError(f"{name} is read from your own files in data.root: nothing to download")
    root = check_writable(root, "data directory (--root)")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for remote in info(name).files:
        path = root / remote.filename
        if not (path.is_file() and md5sum(path) == remote.md5):
            path = _fetch_verified(remote, root, name)
        paths.append(path)
    return paths


# `d2r data download` ----------------------------------------------------------------------------
def add_command(sub: Any) -> None:
    """`d2r data download NAME [--root DIR]` (called by cli.build_parser); the action of `data`
    parses as `sub` does (its type: every subcommand takes the common flags)."""
    dat = sub.add_parser("data", help="data set files")
    dsub = dat.add_subparsers(
        dest="data_command", metavar="ACTION", required=True, action=type(sub)
    )
    dl = dsub.add_parser("download", help="download and verify a data set")
    dl.add_argument("name")
    dl.add_argument("--root", default="data")
    dl.set_defaults(func=_command)


def _command(args: Any) -> int:
    for path in download(args.name, args.root):
        print(path)
    return 0
