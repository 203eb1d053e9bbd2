"""Reading pickles without running code from them.

Pickle can call any importable function while it loads, so a crafted file runs code. Every pickle
this package reads from disk goes through a restricted unpickler instead:

- official MaskDiT ``torch.save`` files (:data:`official_pickle`, for ``torch.load``): tensors,
  storages, dtypes and plain containers are rebuilt; any other object becomes an inert
  placeholder. Every pickle of the file uses it, the magic number, protocol and system-info
  pickles of the legacy (non-zip) format included.
- training states (``torch.distributed.checkpoint`` folders) through :class:`SafeFileSystemReader`:
  ``.metadata`` may name only DCP's own metadata classes, and every non-tensor item (the
  optimizer's ``lr``, ``betas`` ...) is decoded by ``torch.load(weights_only=True)``. Anything else
  is refused with :class:`UnsafePickleError`.
"""
from __future__ import annotations

import collections
import io
import pathlib
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import UserError


class UnsafePickleError(UserError):
    """A file holds a pickled object this package does not load (it could run code)."""


class _Inert:
    """Stands in for any pickled object that is not a tensor or a plain container."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs) -> "_Inert":  # pickled call chains, e.g. getattr(cls, name)(...)
        return _Inert()

    def __setstate__(self, state):
        pass


def _torch_value(name: str) -> Any:
    """``torch.<name>`` if it is a dtype, layout, memory format or storage class, else None."""
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    if name.endswith("Storage") and isinstance(value, type):
        return value
    return None


class _OfficialUnpickler(pickle.Unpickler):
    _allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch", "Size"): torch.Size,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and _torch_value(name) is not None:
            return _torch_value(name)
        return _Inert


def _official_load(file, **kwargs) -> Any:
    return _OfficialUnpickler(file, **kwargs).load()


# The ``pickle_module`` for torch.load of official checkpoints: torch's legacy format reads its
# first pickles with ``pickle_module.load``, the zip format subclasses ``pickle_module.Unpickler``.
official_pickle = types.SimpleNamespace(Unpickler=_OfficialUnpickler, load=_official_load, __name__="pickle")


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = {
    (_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                       "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                       "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
     ("torch", "Size"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata``: its own dataclasses, torch sizes and dtypes, paths; nothing else."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES:
            return pathlib.PurePath if module == "pathlib" else super().find_class(module, name)  # a path, inert
        if module == "torch" and _torch_value(name) is not None:
            return _torch_value(name)
        raise UnsafePickleError(f"{self.source} names {module}.{name}, which a checkpoint's metadata never holds; "
                                "refusing to load it (it could run code). Use only training states written by "
                                "maskdit_fast, or load the EMA weights from a .safetensors file instead")


def load_dcp_metadata(path: str | Path) -> Metadata:
    """The DCP metadata in the file ``path``, read without running code."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # truncated or garbage: any unpickling failure means the same
            raise UserError(f"{path} is damaged ({type(err).__name__}: {err}); remove its checkpoint folder "
                            f"{path.parent} or resume from an earlier one") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path} is not the metadata of a training state (it holds {type(metadata).__name__})")
    return metadata


def _safe_bytes(value: io.BytesIO, source: str) -> io.BytesIO:
    """A non-tensor item decoded with ``weights_only=True`` and written again by us, so that DCP's
    own (unrestricted) ``torch.load`` of it only sees what we wrote."""
    try:
        item = torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "not plain data")
        raise UnsafePickleError(f"{source} holds a non-tensor item that is not plain data ({reason}); "
                                "refusing to load it (it could run code)") from None
    clean = io.BytesIO()
    torch.save(item, clean)
    clean.seek(0)
    return clean


class _SafeBytesPlanner:
    """Forwards to a load planner; its non-tensor items pass through :func:`_safe_bytes` first."""

    def __init__(self, planner, source: str):
        self._planner, self._source = planner, source

    def __getattr__(self, name: str):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self._planner.load_bytes(read_item, _safe_bytes(value, f"{self._source} ({read_item.dest_index.fqn})"))


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata and non-tensor items never unpickle code (tensors are
    already read with ``torch.load(weights_only=True)`` by DCP)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = load_dcp_metadata(Path(self.path) / name)
        if hasattr(metadata, "storage_meta"):  # as FileSystemReader does: tag the metadata with this load
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _SafeBytesPlanner(planner, str(self.path)))
