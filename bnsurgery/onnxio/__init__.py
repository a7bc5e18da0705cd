"""Models in and out, the bottom layer of bnsurgery (it imports only bnsurgery.errors).

- load: `load_model` (paths, bytes, ModelProto; external data checked; weights read lazily on
  request) and `check_model`, the ONNX checker as bad input;
- external: external-data locations, trusted only inside the model's folder;
- lazy: weights left in their files (`tensor_to_array`, `materialize`, `is_lazy`);
- save: `save_model` (atomic, streaming lazy weights file to file) and `atomic_write`;
- compat: what loading normalises of a model ONNX Runtime runs but the checker refuses;
- wire, proto_text: the protobuf wire format and text fields, read without parsing a model.

Importers use the names below: `from bnsurgery.onnxio import load_model`.
"""

from bnsurgery.onnxio.lazy import (
    LazySource,
    has_external_files,
    is_embedded_lazy,
    is_lazy,
    lazy_source,
    materialize,
    tensor_to_array,
)
from bnsurgery.onnxio.load import (
    EXTERNAL_DATA_THRESHOLD,
    ModelSource,
    check_model,
    load_model,
)
from bnsurgery.onnxio.save import atomic_write, save_model, serialize_if_small

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "LazySource",
    "ModelSource",
    "atomic_write",
    "check_model",
    "has_external_files",
    "is_embedded_lazy",
    "is_lazy",
    "lazy_source",
    "load_model",
    "materialize",
    "save_model",
    "serialize_if_small",
    "tensor_to_array",
]
