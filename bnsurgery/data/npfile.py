"""Reading .npz and .npy files (DATA, statistics) with one clear error for anything else.

numpy's loader treats a file that is neither a zip archive nor an .npy array as a pickle, and
refuses it with advice about `allow_pickle`, an option bnsurgery does not have (and a pickle
is not what the user meant). These helpers look at the file's first bytes first, so a file that
is not what its name says is reported as such: "x.npz: not a valid .npz file (...)". Pickled
objects inside a real .npz/.npy are refused too, since loading them could run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from bnsurgery.errors import DataError, first_line_or_type

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first member, or an empty one
NPY_MAGIC = b"\x93NUMPY"


def _kind(path: Path) -> str | None:
    """'npz', 'npy', or None for neither, from the file's first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head[:4] in ZIP_MAGICS:
        return "npz"
    if head == NPY_MAGIC:
        return "npy"
    return None


def _invalid(path: Path, expected: str, why: str) -> DataError:
    return DataError(f"{path}: not a valid {expected} file ({why})")


def _why(path: Path, found: str | None) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if found is None:
        return "it is neither a zip archive of .npy arrays nor an .npy array"
    return f"it is an .{found} file; give it the .{found} suffix"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, zipfile.BadZipFile | EOFError):
        return "a truncated or damaged zip archive"
    text = str(exc)
    if "pickle" in text.lower():  # object arrays: numpy's message names an option we lack
        return "it holds pickled Python objects, which bnsurgery does not load; save numeric arrays"
    return first_line_or_type(exc)


def npz_keys(path: Path) -> list[str]:
    """The array names an .npz holds, without reading the arrays."""
    found = _kind(path)
    if found != "npz":
        raise _invalid(path, ".npz", _why(path, found))
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _invalid(path, ".npz", _reason(exc)) from None


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by name."""
    found = _kind(path)
    if found != "npz":
        raise _invalid(path, ".npz", _why(path, found))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _invalid(path, ".npz", _reason(exc)) from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # a zip member that is not an .npy array
            raise _invalid(path, ".npz", f"member '{key}' is not an .npy array")
    return arrays


def load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """The array of an .npy file (memory-mapped when `mmap`, to read only its header)."""
    found = _kind(path)
    if found != "npy":
        raise _invalid(path, ".npy", _why(path, found))
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _invalid(path, ".npy", _reason(exc)) from None
