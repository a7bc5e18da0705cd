"""Loading and saving models safely.

Loading accepts a path, bytes or a ModelProto, resolves external data only inside the model's
own folder, and turns every failure into a one-line BadInputError. Saving is atomic: the model
(and its external data, when it is large or when asked) is written to a temporary folder beside
the target and renamed into place, so a failure never leaves a partial output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from bnsurgery.errors import BadInputError, UnsafePathError, UsageError

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto

# Protobuf cannot serialise a message past 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def load_model(source: ModelSource, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (returned as is), with external data."""
    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, bytes | bytearray):
        model = _parse_bytes(bytes(source), "<bytes>")
        if any(uses_external_data(t) for t in _all_tensors(model)):
            raise BadInputError("model given as bytes refers to external data; pass its path")
    else:
        model = _load_path(Path(source))
    if check:
        check_model(model)
    return model


def _load_path(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, expected an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    model = _parse_bytes(data, str(path))
    _load_external_data(model, path.parent.resolve(), path)
    return model


def _parse_bytes(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on backend
        raise BadInputError(f"{label}: not an ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise BadInputError(f"{label}: not an ONNX model (no graph or no opset_import)")
    return model


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def safe_external_path(base_dir: Path, location: str, model_path: Path | str) -> Path:
    """Resolve an external-data location, refusing anything that leaves the model's folder."""
    if not location:
        raise UnsafePathError(f"{model_path}: external data with an empty location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise UnsafePathError(f"{model_path}: external data path '{location}' is absolute")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise UnsafePathError(f"{model_path}: external data path '{location}' contains '..'")
    resolved = (base_dir / location).resolve()
    if base_dir != resolved and base_dir not in resolved.parents:
        raise UnsafePathError(
            f"{model_path}: external data path '{location}' leaves the model's folder"
        )
    if not resolved.is_file():
        raise BadInputError(f"{model_path}: external data file '{location}' is missing")
    return resolved


def _load_external_data(model: onnx.ModelProto, base_dir: Path, model_path: Path) -> None:
    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not tensors:
        return
    handles: dict[Path, object] = {}
    try:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            file = safe_external_path(base_dir, info.location, model_path)
            if file not in handles:
                handles[file] = open(file, "rb")
            fh = handles[file]
            fh.seek(info.offset or 0)  # type: ignore[attr-defined]
            raw = fh.read(info.length) if info.length else fh.read()  # type: ignore[attr-defined]
            if info.length and len(raw) != info.length:
                raise BadInputError(
                    f"{model_path}: external data for '{tensor.name}' is truncated "
                    f"in '{info.location}'"
                )
            tensor.raw_data = raw
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for fh in handles.values():
            fh.close()  # type: ignore[attr-defined]


def check_model(model: onnx.ModelProto) -> None:
    """Run the ONNX checker; a failure is bad input (exit 2)."""
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            _check_large(model)
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise BadInputError(f"model fails the ONNX checker: {first}") from None


def _check_large(model: onnx.ModelProto) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.data")
        onnx.checker.check_model(str(path))


def resolve_output_path(
    model_path: str | os.PathLike[str] | None,
    out: str | os.PathLike[str] | None,
    command: str,
    *,
    in_place: bool = False,
) -> Path:
    """The output path of a command: OUT, or `<stem>.<command>.onnx` beside MODEL."""
    if in_place:
        if model_path is None:
            raise UsageError("--in-place needs a model path")
        if out is not None and Path(out).resolve() != Path(model_path).resolve():
            raise UsageError("--in-place and -o/--output name different files")
        return Path(model_path)
    if out is None:
        if model_path is None:
            raise UsageError("an output path is needed when the model is not a file")
        src = Path(model_path)
        return src.with_name(f"{src.stem}.{command}.onnx")
    target = Path(out)
    if model_path is not None and target.exists() and _same_file(target, Path(model_path)):
        raise UsageError(f"output {target} is the input model; use --in-place to overwrite it")
    if model_path is not None and target.resolve() == Path(model_path).resolve():
        raise UsageError(f"output {target} is the input model; use --in-place to overwrite it")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> Path:
    """Write a model atomically; external data goes to `<name>.data` beside it when used.

    external_data=None decides by size (over ~2 GB); True or False forces the choice.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"{target}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{target}: output folder {folder} is not writable")
    use_external = (
        model.ByteSize() > EXTERNAL_DATA_THRESHOLD if external_data is None else (external_data)
    )
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:
        raise BadInputError(f"{target}: cannot write to {folder} ({exc.strerror})") from None
    try:
        staged_model = staging / target.name
        data_name = f"{target.name}.data"
        if use_external:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(
                to_save,
                str(staged_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if (staging / data_name).exists():  # every tensor under the threshold: none
                os.replace(staging / data_name, folder / data_name)
        else:
            with open(staged_model, "wb") as fh:
                fh.write(model.SerializeToString())
        os.replace(staged_model, target)
    except OSError as exc:
        raise BadInputError(f"{target}: cannot write ({exc.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
