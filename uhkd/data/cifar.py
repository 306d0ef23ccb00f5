"""CIFAR-100 from the official python archive (docs/protocol.md#datasets), read with our own loader.

The archive is a pickle, and unpickling can run any code a crafted file names: `_SafeUnpickler` admits only the
globals the format needs to rebuild numpy arrays (dicts, lists, str/bytes and ints need none), and refuses the rest.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .memory import ArrayDataset

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
EXPECTED = f"{FOLDER}/ (with train, test) or {ARCHIVE}"
# (module, name) a numpy array's pickle refers to; numpy < 2 writes `numpy.core`, numpy >= 2 `numpy._core`; Python 3
# pickles of protocol <= 2 spell bytes as `_codecs.encode(text, "latin1")`
_ALLOWED_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside `_ALLOWED_GLOBALS` (a crafted file trying to run code)."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        if module == "numpy.core.multiarray":  # the numpy >= 2 home of the same function
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def safe_loads(raw: bytes) -> object:
    """Unpickle a CIFAR-100 batch (Python 2 strings as bytes), admitting only what the format needs."""
    return _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()


class CIFAR100(ArrayDataset):
    """CIFAR-100 as (image, fine label). `root` is a folder holding `cifar-100-python/` or the `.tar.gz`,
    the extracted folder itself, or the archive file; `download=True` fetches the archive when it is missing."""

    def __init__(self, root: str, train: bool = True, transform: Callable | None = None,
                 download: bool = False) -> None:
        if download and locate(Path(root)) is None:
            download_cifar100(root)
        images, labels = read_cifar100(root, train)
        super().__init__(images, labels, transform)


def locate(root: Path) -> Path | None:
    """The archive file or the extracted folder under `root`, or None."""
    for candidate in (root, root / FOLDER, root / ARCHIVE):
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            return candidate
        if candidate.is_dir() and (candidate / "train").is_file():
            return candidate
    return None


def require(root: str) -> Path:
    path = locate(Path(root))
    if path is None:
        raise UserError(f"CIFAR-100 not found at {root!r}: expected {EXPECTED} there (or pass --download)")
    return path


def read_cifar100(root: str, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8 (N, 32, 32, 3), fine labels int64 (N,))` of the `train` or `test` pickle."""
    path = require(root)
    part = "train" if train else "test"
    try:
        if path.is_dir():
            raw = (path / part).read_bytes()
        else:
            with tarfile.open(path, "r:gz") as tar:
                member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == part), None)
                if member is None:
                    raise UserError(f"CIFAR-100 archive {str(path)!r} has no {part!r} file; expected {EXPECTED}")
                raw = tar.extractfile(member).read()
        batch = safe_loads(raw)
    except UserError:
        raise
    except RefusedGlobal as exc:
        raise UserError(f"refusing CIFAR-100 {part!r} from {str(path)!r}: its pickle calls {exc}, but the format holds "
                        f"only numpy arrays, lists, dicts, strings and ints (a crafted or foreign file)") from None
    except Exception as exc:  # any unreadable archive or pickle is a corrupted dataset, reported in one line
        reason = " ".join(str(exc).split())  # one line even for tarfile's multi-line messages
        raise UserError(f"cannot read CIFAR-100 {part!r} from {str(path)!r} ({type(exc).__name__}: {reason}); "
                        f"expected the python pickle archive {EXPECTED}") from None
    return _decode(batch, f"{path}:{part}")


def _decode(batch: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalise str/bytes keys and check the layout: `data` (N, 3072) uint8 as 1024 R, 1024 G, 1024 B."""
    if not isinstance(batch, dict):
        raise UserError(f"corrupted CIFAR-100 file {where!r}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "fine_labels" not in batch:
        raise UserError(f"corrupted CIFAR-100 file {where!r}: expected keys 'data' and 'fine_labels', "
                        f"found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"corrupted CIFAR-100 file {where!r}: expected uint8 data (N, 3072) and N fine_labels, "
                        f"got data {data.dtype} {data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        raise UserError(f"corrupted CIFAR-100 file {where!r}: fine_labels must be in 0..99, "
                        f"got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar100(root: str, url: str = URL, md5: str = MD5) -> Path:
    """Fetch the archive into `root` and check its md5; an existing archive with the right md5 is kept."""
    target = Path(root) / ARCHIVE
    if target.is_file() and _md5(target) == md5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as exc:
            Path(tmp.name).unlink()
            raise UserError(f"cannot download CIFAR-100 from {url!r}: {exc}") from None
    got = _md5(Path(tmp.name))
    if got != md5:
        Path(tmp.name).unlink()
        raise UserError(f"CIFAR-100 download from {url!r} has md5 {got}, expected {md5}")
    Path(tmp.name).replace(target)
    return target
