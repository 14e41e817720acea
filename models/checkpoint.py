"""Generic single-file `.safetensors` I/O shared by every model family.

Reading is lazy (memory-mapped, one tensor at a time); loading checks the whole key set and every
shape before anything is assigned; saving is atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from core.fsio import commit_file, save_safetensors, temp_path, with_path

# How many names of each kind an error message lists before it only counts.
MAX_LISTED = 20
# modelspec version written by kohya sd-scripts and Stability's tools.
MODELSPEC_VERSION = "1.0.0"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class SafeTensorFile:
    """Lazy, memory-mapped reader of one .safetensors file (safetensors.safe_open). Reading a tensor does not load the others."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        try:
            self._file = safe_open(self.path, framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a valid .safetensors file (truncated or another format?): {e}") from e
        self.metadata: dict[str, str] = dict(self._file.metadata() or {})
        self._keys: list[str] = list(self._file.keys())

    def __repr__(self) -> str:
        return f"SafeTensorFile({self.path!r}, {len(self._keys)} tensors)"

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def keys(self) -> list[str]:
        """All tensor names in file order."""
        return list(self._keys)

    def _check_key(self, key: str) -> None:
        if key not in self._keys:
            raise CheckpointError(f"{self.path}: no tensor named {key!r} ({len(self._keys)} tensors in the file)")

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor from the header (no data read)."""
        self._check_key(key)
        return tuple(self._file.get_slice(key).get_shape())

    def shapes(self, prefix: str = "", strip: bool = True) -> dict[str, tuple[int, ...]]:
        """Key -> shape of the tensors under `prefix` (prefix removed when `strip`), header only."""
        return {
            (k[len(prefix) :] if strip else k): tuple(self._file.get_slice(k).get_shape())
            for k in self._keys
            if k.startswith(prefix)
        }

    def get(self, key: str) -> Tensor:
        """Read one tensor (CPU, stored dtype): a view of the file's memory map, so copy what is kept."""
        self._check_key(key)
        try:
            return self._file.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {e}") from e


# Pickle-based checkpoint suffixes (read with torch.load(weights_only=True) only).
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
# Keys of LDM-trained .ckpt files that are not the model (EMA copies and counters); diffusers' converter skips them too.
TORCH_SKIP_PREFIXES = ("model_ema.",)


class TorchFile:
    """A `.ckpt` / `.pt` checkpoint read with `torch.load(weights_only=True, mmap=True)` only: no pickled code runs,
    tensors stay memory-mapped. A top-level `state_dict` (LDM / A1111 files) is unwrapped; non-tensor entries
    (epoch, global_step) are dropped. Same interface as SafeTensorFile."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: torch.load(weights_only=True) refused it (it holds pickled objects "
                                  f"that could run code: {reason[:200]}); sdtrain does not unpickle code: convert it to "
                                  ".safetensors with a tool you trust") from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint (truncated, or the legacy non-zip "
                                  f"format that cannot be memory-mapped?): {first[:200]}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a state dict of tensors")
        self._tensors: dict[str, Tensor] = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)
                                            and not k.startswith(TORCH_SKIP_PREFIXES)}
        if not self._tensors:
            raise CheckpointError(f"{self.path}: no tensors found (expected a state dict, or one under 'state_dict')")
        self.metadata: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"TorchFile({self.path!r}, {len(self._tensors)} tensors)"

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.get(key).shape)

    def shapes(self, prefix: str = "", strip: bool = True) -> dict[str, tuple[int, ...]]:
        return {(k[len(prefix):] if strip else k): tuple(v.shape) for k, v in self._tensors.items() if k.startswith(prefix)}

    def get(self, key: str) -> Tensor:
        if key not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor named {key!r} ({len(self._tensors)} tensors in the file)")
        return self._tensors[key]


# ---------------------------------------------------------------------------------------------
# Loading into a module
# ---------------------------------------------------------------------------------------------


def _listing(title: str, items: Sequence[str]) -> str:
    """'title (n): a, b, ... (+k more)' for an error message."""
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}): {shown}{more}"


def check_module_keys(module: nn.Module, get: Callable[[str], Tensor] | None, keys: Iterable[str], *,
                      prefix: str = "", ignore: Sequence[str] = (), source: str = "",
                      shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, str]:
    """load_module's check, alone: every key and shape of `module` (built on the meta device is enough) against
    the file's keys under `prefix`, without reading a tensor. Raises one CheckpointError listing missing /
    unexpected / mis-shaped keys and `source`; returns {module key: file key}. Shapes from `shapes`, else the
    header of `get`'s SafeTensorFile, else `get` itself."""
    where = f" from {source}" if source else ""
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    present = [k for k in keys if k.startswith(prefix)]
    found = {k[len(prefix) :]: k for k in present}

    def ignored(stripped: str) -> bool:
        return any(fnmatch.fnmatchcase(prefix + stripped, p) or fnmatch.fnmatchcase(stripped, p) for p in ignore)

    if shapes is None:
        assert get is not None, "check_module_keys needs `shapes` or `get`"
        owner = getattr(get, "__self__", None)
        shape_of: Callable[[str], Sequence[int]] = owner.shape if isinstance(owner, SafeTensorFile) else (lambda k: get(k).shape)
    else:
        shape_of = lambda k: shapes[k]  # noqa: E731

    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(prefix + k for k in found if k not in expected and not ignored(k))
    misshaped = []
    for k in sorted(set(expected) & set(found)):
        got = tuple(int(s) for s in shape_of(found[k]))
        if got != expected[k]:
            misshaped.append(f"{prefix}{k} {list(got)} (model {list(expected[k])})")
    if missing or unexpected or misshaped:
        lines = [f"checkpoint does not match {type(module).__name__}{where} (prefix {prefix!r}):"]
        if missing:
            lines.append(_listing("missing", [prefix + k for k in missing]))
        if unexpected:
            lines.append(_listing("unexpected", unexpected))
        if misshaped:
            lines.append(_listing("wrong shape", misshaped))
        raise CheckpointError("\n".join(lines))
    return found


def load_module(
    module: nn.Module,
    get: Callable[[str], Tensor],
    keys: Iterable[str],
    *,
    prefix: str = "",
    ignore: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    source: str = "",
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Fill `module` (typically built on the meta device) from tensors named prefix + <module key>.

    - Only `keys` starting with `prefix` belong to this module (a single file holds several models);
      of those, keys the module lacks are errors unless they match an fnmatch pattern of `ignore`
      (tried against both the full and the stripped key, e.g. '*.position_ids').
    - The full key set and every shape are checked before anything is assigned; problems raise one
      CheckpointError listing missing / unexpected / mis-shaped keys and `source`.
      Shapes come from `shapes` (full keys) if given, else from the header when `get` is
      `SafeTensorFile.get`, else from `get` itself (fine for in-memory dicts).
    - Floating-point tensors are cast to `dtype` (None keeps the stored dtype), all moved to `device`,
      one at a time, then assigned with `load_state_dict(assign=True)`, so weights never exist twice. A tensor
      neither cast nor moved is copied: no weight stays a view of the file (which would keep it mapped).
    - Non-persistent buffers (absent from checkpoints) are rebuilt after a meta build: every submodule
      defining `init_buffers(device: torch.device) -> None` has it called after the assignment; a buffer
      still on the meta device afterwards is an error. Real (non-meta) ones are moved to `device`.
    """
    device = torch.device(device)
    where = f" from {source}" if source else ""
    found = check_module_keys(module, get, keys, prefix=prefix, ignore=ignore, source=source, shapes=shapes)
    expected = module.state_dict(keep_vars=True)

    state: dict[str, Tensor] = {}
    for k in expected:
        src = get(found[k])
        t = src.to(dtype=dtype) if dtype is not None and src.is_floating_point() else src
        t = t.to(device)
        if t.numel() and t.data_ptr() == src.data_ptr():
            # Nothing converted or moved: still a view of the file's memory map, which one kept view holds for
            # the whole run (page cache counted as the process's memory). Own the memory instead.
            t = t.clone()
        state[k] = t
    module.load_state_dict(state, strict=True, assign=True)
    del state

    for m in module.modules():
        init = getattr(m, "init_buffers", None)
        if callable(init):
            init(device=device)
    left = [name for name, buf in module.named_buffers() if buf.is_meta]
    for m in module.modules():
        for name in list(m._non_persistent_buffers_set):
            buf = m._buffers.get(name)
            if buf is not None and not buf.is_meta and buf.device != device:
                m._buffers[name] = buf.to(device)
    if left:
        raise CheckpointError(
            f"{type(module).__name__}{where}: buffers still on the meta device after loading: {left[:MAX_LISTED]} "
            "(give the owning module an init_buffers(device) method that recreates them)"
        )


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_safetensors_atomic(tensors: Mapping[str, Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write through a temporary (`<path>.tmp-sdtrain-<host>-<pid>`), fsync, rename, fsync the directory; on
    failure the temporary is removed and the old file is untouched."""
    path = str(path)
    meta = dict(metadata or {})
    bad_meta = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad_meta:
        raise CheckpointError(f"safetensors metadata must map str -> str; offending keys: {bad_meta[:MAX_LISTED]}")
    out: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"cannot save {k!r} to {path}: expected a tensor, got {type(v).__name__}")
        if v.is_meta:
            raise CheckpointError(f"cannot save {k!r} to {path}: it is on the meta device (never loaded)")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:
            t = t.clone()  # tied weights: safetensors refuses shared storage, so store an independent copy
        seen_storage.add(ptr)
        out[k] = t
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(out, path, metadata=meta or None)  # our own temporary (core/fsio.py), none of the library's


# Optional descriptive modelspec fields (sai_model_spec 1.0.0 "should" / "can" fields), set from [save].
MODELSPEC_INFO = ("author", "description", "license", "tags")


def modelspec_metadata(
    architecture: str,
    title: str,
    resolution: str,
    prediction_type: str | None = None,
    extra: Mapping[str, str] | None = None,
    *,
    implementation: str = "",
    info: Mapping[str, str] | None = None,
    hash_sha256: str = "",
) -> dict[str, str]:
    """modelspec header fields: sai_model_spec 1.0.0, architecture, implementation, title, ISO date (seconds, local
    time, as kohya writes it), resolution ("WxH"), prediction_type, hash_sha256, and the descriptive `info` fields
    (author, description, license, tags) that are non-empty; `extra` (str -> str) is added as given."""
    for name, value in (("architecture", architecture), ("title", title), ("resolution", resolution)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"modelspec {name} must be a non-empty string, got {value!r}")
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": resolution,
    }
    if implementation:
        meta["modelspec.implementation"] = implementation
    if prediction_type is not None:
        meta["modelspec.prediction_type"] = prediction_type
    if hash_sha256:
        meta["modelspec.hash_sha256"] = hash_sha256
    for k, v in (info or {}).items():
        if k not in MODELSPEC_INFO:
            raise ValueError(f"unknown modelspec info field {k!r}; known: {', '.join(MODELSPEC_INFO)}")
        if v:
            meta[f"modelspec.{k}"] = str(v)
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"modelspec extra metadata must map str -> str, got {k!r}: {v!r}")
        meta[k] = v
    return meta


def modelspec_hash(tensors: Mapping[str, Tensor]) -> str:
    """modelspec.hash_sha256 as kohya sd-scripts computes it (library/sai_model_spec.py
    precalculate_safetensors_hashes): sha256 over each tensor's raw little-endian bytes (its safetensors data
    section), one tensor after another in the given order, as '0x' + hex. Tensor by tensor, no full copy."""
    h = hashlib.sha256()
    for t in tensors.values():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return f"0x{h.hexdigest()}"


def cast_state_dict(sd: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Cast floating-point tensors to `dtype` (None: unchanged); integer / bool tensors are kept as they are."""
    if dtype is None:
        return dict(sd)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# Streamed writing: header first, then one tensor at a time
# ---------------------------------------------------------------------------------------------

# safetensors dtype names (the format's spec, safetensors/src/tensor.rs `Dtype`)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# The header is padded with spaces to a multiple of 8 bytes, as safetensors' own writer does (aligned data).
HEADER_ALIGN = 8
# Stands in for a sha256 of the data ('0x' + 64 hex digits, as modelspec_hash writes it) until the data is written.
SHA256_PLACEHOLDER = "0x" + "0" * 64


def safetensors_header(specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header of a .safetensors file whose tensors (name -> (dtype, shape)) follow
    in the given order, back to back."""
    import json

    header: dict[str, object] = {}
    meta = dict(metadata or {})
    bad_meta = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad_meta:
        raise CheckpointError(f"safetensors metadata must map str -> str; offending keys: {bad_meta[:MAX_LISTED]}")
    if meta:
        header["__metadata__"] = meta
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot save {name!r}: dtype {dtype} has no safetensors name")
        n = 1
        for s in shape:
            n *= int(s)
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw


class StreamedSafetensorsWriter:
    """Write a .safetensors file one tensor at a time, so only the tensor being written is in memory.

    Names, dtypes and shapes are known before any data (for FSDP2 shards: the global shapes), so the
    header goes first; then `write(name, tensor)` in header order appends each tensor's bytes. `close()`
    checks every tensor was written, fsyncs and renames the temp file into place (atomic, like
    save_safetensors_atomic); on any error the temp file is removed and an old file at `path` is untouched.
    Use as a context manager.

    `sha256_field`: a metadata key that receives '0x' + the sha256 of the data section, i.e. of every tensor's
    bytes in order (= modelspec_hash of the same tensors): written as a same-length placeholder first, hashed on
    the way, and filled in at `close()`.
    """

    def __init__(self, path: str, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, sha256_field: str | None = None):
        self.path = str(path)
        self.specs = {k: (d, tuple(int(s) for s in shape)) for k, (d, shape) in specs.items()}
        self._order = list(self.specs)
        self._next = 0
        self._hash, self._hash_at = None, -1
        if sha256_field is not None:
            import hashlib

            metadata = {**(metadata or {}), sha256_field: SHA256_PLACEHOLDER}
            self._hash = hashlib.sha256()
        header = safetensors_header(self.specs, metadata)
        if self._hash is not None:
            placeholder = SHA256_PLACEHOLDER.encode()
            if header.count(placeholder) != 1:
                raise CheckpointError(f"{self.path}: the metadata already holds {SHA256_PLACEHOLDER!r}")
            self._hash_at = header.index(placeholder)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._tmp = temp_path(self.path)  # recognisable: a stale one is cleaned at the next start
        try:
            self._f = open(self._tmp, "wb")
        except OSError as e:  # a read-only or forbidden folder: name the file the user asked for
            raise with_path(e, self.path) from None
        try:
            self._f.write(header)
        except BaseException as e:
            self.abort()
            raise with_path(e, self.path) if isinstance(e, OSError) else e

    def write(self, name: str, tensor: Tensor) -> None:
        """Append `name`'s data; must be the next name of the header, with its dtype and shape."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing (all written)"
            raise CheckpointError(f"{self.path}: tensors out of order: got {name!r}, expected {want!r}")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.path}: {name!r} is {tensor.dtype} {list(tensor.shape)}, the header says "
                                  f"{dtype} {list(shape)}")
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {name!r} to {self.path}: it is on the meta device (never loaded)")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            data = t.view(torch.uint8).numpy().data  # no extra copy of the bytes (little-endian hosts)
            try:
                self._f.write(data)
            except OSError as e:  # a full disk: write() errors name no file
                raise with_path(e, self.path) from None
            if self._hash is not None:
                self._hash.update(data)
        self._next += 1

    def close(self) -> None:
        """All written: the umask's normal mode, fsync, rename into place, fsync the directory (core.fsio.commit_file)."""
        if self._next != len(self._order):
            missing = self._order[self._next:]
            self.abort()
            raise CheckpointError(f"{self.path}: {len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        try:
            if self._hash is not None:
                self._f.seek(self._hash_at)
                self._f.write(f"0x{self._hash.hexdigest()}".encode())
            self._f.close()
            commit_file(self._tmp, self.path)
        except BaseException as e:
            self.abort()
            raise with_path(e, self.path) if isinstance(e, OSError) else e

    def abort(self) -> None:
        """Drop the partial temp file (the file at `path`, if any, stays as it was)."""
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)

    def __enter__(self) -> "StreamedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_safetensors_streamed(tensors: Mapping[str, Tensor], path: str, dtype: torch.dtype | None = None,
                              metadata: Mapping[str, str] | None = None,
                              gather: Callable[[Tensor], Tensor] | None = None, write: bool = True,
                              sha256_field: str | None = None) -> None:
    """Save `tensors` (floating-point ones cast to `dtype`; None keeps each dtype) one at a time.

    `gather` turns a value into the full CPU-or-device tensor just before it is written (FSDP2:
    `DTensor.full_tensor`, a collective: then every rank calls this with the same keys in the same order
    and only the rank with `write=True` writes). Values only need `.shape`, `.dtype` and
    `.is_floating_point()` until then, so the writing rank holds one gathered tensor at a time, never the
    whole model. Tensors sharing storage (tied weights) are simply written twice. `sha256_field`: see
    StreamedSafetensorsWriter.
    """
    def out_dtype(v: Tensor) -> torch.dtype:
        return dtype if dtype is not None and v.is_floating_point() else v.dtype

    writer = StreamedSafetensorsWriter(path, {k: (out_dtype(v), tuple(v.shape)) for k, v in tensors.items()},
                                       metadata, sha256_field) if write else None
    try:
        for k, v in tensors.items():
            if not isinstance(v, Tensor):
                raise CheckpointError(f"cannot save {k!r} to {path}: expected a tensor, got {type(v).__name__}")
            full = gather(v) if gather is not None else v
            if full.is_meta:
                raise CheckpointError(f"cannot save {k!r} to {path}: it is on the meta device (never loaded)")
            if writer is not None:
                writer.write(k, full.detach().to("cpu", out_dtype(v)))
            del full
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
