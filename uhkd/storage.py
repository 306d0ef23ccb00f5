"""Locations: a local folder or file, or a pyarrow filesystem URI (`s3://bucket/path`, `gs://…`, and the endpoint
form `s3://bucket/path?endpoint_override=HOST:PORT&scheme=http`). Results, checkpoints, exported students and
teachers live at locations; a node that needs a local file (a teacher checkpoint to `torch.load`) fetches it once
into its cache (`UHKD_CACHE`, default `~/.cache/uhkd`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

from .errors import UserError, one_line


def is_uri(location: str) -> bool:
    return "://" in location


def _with_env_endpoint(uri: str) -> str:
    """An `s3://` URI without `endpoint_override` gets the one AWS_ENDPOINT_URL(_S3) names, which boto3 users set
    for MinIO-like stores and pyarrow (26) ignores."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    if parts.scheme != "s3" or not endpoint or "endpoint_override" in query:
        return uri
    target = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.update(endpoint_override=target.netloc, scheme=target.scheme or "https")
    return urlunsplit(parts._replace(query=urlencode(query)))


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a pyarrow filesystem URI (file://, s3://, gs://, hdfs://)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(_with_env_endpoint(location))
    except Exception as exc:  # pyarrow raises several types for unknown schemes and unreachable stores
        raise UserError(f"cannot open location {location!r}: {exc}") from None


def join(location: str, *parts: str) -> str:
    """`location/part/...`: a local path made absolute, or a URI with the parts joined inside its path (never after
    its query string)."""
    if not is_uri(location):
        return str(Path(location).expanduser().resolve().joinpath(*parts))
    url = urlsplit(location)
    path = "/".join([url.path.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])
    return urlunsplit(url._replace(path=path))


def location_of(path: str, root: str) -> str:
    """The location of `path`, a path on the filesystem of location `root` under `root`'s own path (what Ray
    reports for a checkpoint), written like `root` (with its scheme and query string)."""
    if not is_uri(root):
        return path
    _, base = open_location(root)
    relative = path[len(base):] if path.startswith(base) else path
    return join(root, *relative.strip("/").split("/"))


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Tune and Ray Train: a local path alone, or a URI's path and its
    filesystem (so the query string's endpoint and options reach every node)."""
    fs, path = open_location(location)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)


# A run's checkpoint is a folder of these files (uhkd.trainer writes them, the consoles and the sweep driver read them)
CHECKPOINT = "checkpoint.pt"  # the run's state, every report so far included
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # in-process runs: the state before the latest, to fall back to
STUDENT = "student.pt"  # the exported student, in the checkpoint of a run's last epoch
METRICS_LOG = "metrics.jsonl"  # the reports, one JSON line each, for readers that should not load the state


def checkpoint_folders(fs: pafs.FileSystem, run: str) -> list[str]:
    """The `checkpoint_*` folders Tune or Ray Train saved in the run folder `run` on `fs`, newest first (their
    names sort by time); [] while there is none."""
    infos = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)


def exists(location: str) -> bool:
    """Whether a file is at `location`; a store that does not answer is a `UserError` naming it."""
    fs, path = open_location(location)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as exc:
        raise UserError(f"cannot reach {location!r}: {one_line(exc, 200)}") from None


def check_folder(location: str, what: str) -> None:
    """A `UserError` in one line unless `location` is, or can become, a folder this process writes: its store
    answers, it is no file, and locally its nearest existing folder is writable. Creates nothing."""
    fs, path = open_location(location)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise UserError(f"{what} {location!r} cannot be reached: {one_line(exc, 200)}") from None
    if kind == pafs.FileType.File:
        raise UserError(f"{what} {location!r} is a file, not a folder")
    if isinstance(fs, pafs.LocalFileSystem):
        existing = Path(path)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{what} {location!r} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{what} {location!r} cannot be written: {existing} is not writable by this user")


def copy(source: str, target: str) -> None:
    """Copy a file between locations; the target appears whole (a rename locally, one upload on object stores)."""
    src_fs, src = open_location(source)
    dst_fs, dst = open_location(target)
    dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
    if isinstance(dst_fs, pafs.LocalFileSystem):
        tmp = f"{dst}.tmp-{os.getpid()}"
        pafs.copy_files(src, tmp, source_filesystem=src_fs, destination_filesystem=dst_fs)
        os.replace(tmp, dst)
    else:
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def cache_dir() -> Path:
    return Path(os.environ.get("UHKD_CACHE") or "~/.cache/uhkd").expanduser()


def local_file(location: str) -> str:
    """A local path holding the file at `location`: the path itself, or this node's cached copy of a URI (fetched
    on first use; concurrent fetches each write a private temporary file and rename it into place)."""
    if not location or not is_uri(location):
        return location
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = cache_dir() / key / Path(urlsplit(location).path).name
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = open_location(location)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot fetch {location!r}: {exc}") from None
    return str(target)
