"""Tests of models/checkpoint.py: safetensors round trips, strict loading, atomic saves."""

import os

import pytest
import torch
from torch import nn

import models.checkpoint as ckpt
from models.checkpoint import (
    CheckpointError,
    SafeTensorFile,
    cast_state_dict,
    load_module,
    modelspec_metadata,
    save_safetensors_atomic,
)

safetensors_torch = pytest.importorskip("safetensors.torch")


class Block(nn.Module):
    """Linear + LayerNorm, an int persistent buffer and a non-persistent buffer rebuilt by init_buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("position_ids", torch.arange(5), persistent=True)
        self.register_buffer("freqs", torch.empty(2), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.freqs = torch.tensor([1.0, 0.5], device=device)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(3, 2, bias=False)


def _weights(prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A file-like state dict for Net under `prefix` plus tensors of another model."""
    sd = {prefix + k: torch.randn(v.shape) if v.is_floating_point() else torch.arange(5) for k, v in Net().state_dict().items()}
    sd["other.weight"] = torch.randn(2, 2)  # another model in the same file: not ours, not an error
    return sd


# --- save / read ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_reload_bit_exact(tmp_path, dtype):
    """Reference: safetensors.torch.load_file / safe_open as the independent reader; values compared bit-exact."""
    tensors = {"a.weight": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype), "ids": torch.arange(4)}
    tensors["t"] = torch.randn(4, 6).to(dtype).t()  # non-contiguous: must be made contiguous
    meta = modelspec_metadata("stable-diffusion-xl-v1-base", "test", "1024x1024", "epsilon", extra={"ss_note": "x"})
    path = str(tmp_path / "m.safetensors")
    save_safetensors_atomic(tensors, path, meta)

    ref = safetensors_torch.load_file(path)
    f = SafeTensorFile(path)
    assert sorted(f.keys()) == sorted(tensors) == sorted(ref)
    assert f.metadata == meta
    for k, v in tensors.items():
        for got in (ref[k], f.get(k)):
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), k  # bits
        assert f.shape(k) == tuple(v.shape)
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_shapes_from_header_with_prefix(tmp_path):
    """Analytic: shapes() returns the stored shapes under a prefix, stripped or not, without reading data."""
    path = str(tmp_path / "m.safetensors")
    save_safetensors_atomic({"first_stage_model.a": torch.zeros(2, 3), "model.b": torch.zeros(4)}, path)
    f = SafeTensorFile(path)
    assert f.shapes("first_stage_model.") == {"a": (2, 3)}
    assert f.shapes("first_stage_model.", strip=False) == {"first_stage_model.a": (2, 3)}
    assert f.shapes() == {"first_stage_model.a": (2, 3), "model.b": (4,)}
    with pytest.raises(CheckpointError, match="nope"):
        f.get("nope")


def test_tied_tensors_are_saved(tmp_path):
    """Reference: safetensors refuses shared storage; tied weights must still save and reload equal."""
    w = torch.randn(3, 3)
    path = str(tmp_path / "tied.safetensors")
    save_safetensors_atomic({"a": w, "b": w}, path)
    ref = safetensors_torch.load_file(path)
    assert torch.equal(ref["a"], w) and torch.equal(ref["b"], w)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", "truncate"])
def test_bad_files_name_the_path(tmp_path, content):
    """Reference: a file written by safetensors.torch.save_file, truncated; and non-safetensors bytes."""
    path = tmp_path / "bad.safetensors"
    if content == "truncate":
        safetensors_torch.save_file({"a": torch.randn(64, 64)}, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        SafeTensorFile(str(path))
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        SafeTensorFile(str(tmp_path / "missing.safetensors"))


# --- load_module ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_into_meta_module(tmp_path, dtype):
    """Reference: values read back by safetensors.torch.load_file, cast with torch's .to(dtype)."""
    path = str(tmp_path / "m.safetensors")
    sd = _weights()
    save_safetensors_atomic(sd, path)
    f = SafeTensorFile(path)
    with torch.device("meta"):
        net = Net()
    load_module(net, f.get, f.keys(), prefix="model.", dtype=dtype, source=path)
    ref = safetensors_torch.load_file(path)
    for k, v in net.state_dict().items():
        assert not v.is_meta and v.device.type == "cpu"
        src = ref["model." + k]
        expect = src.to(dtype) if dtype is not None and src.is_floating_point() else src
        assert v.dtype == expect.dtype and torch.equal(v, expect), k
    assert net.blocks[0].position_ids.dtype == torch.int64  # integer buffers are never cast
    assert torch.equal(net.blocks[1].freqs, torch.tensor([1.0, 0.5]))  # non-persistent buffer via init_buffers
    assert isinstance(net.head.weight, nn.Parameter) and net.head.weight.requires_grad


def _load_error(sd: dict, **kw) -> str:
    with torch.device("meta"):
        net = Net()
    with pytest.raises(CheckpointError) as e:
        load_module(net, sd.__getitem__, sd.keys(), prefix="model.", source="file.safetensors", **kw)
    assert all(p.is_meta for p in net.parameters())  # nothing assigned before the check failed
    return str(e.value)


def test_missing_key_is_named():
    """Analytic: a dict lacking one key of Net's state_dict."""
    sd = _weights()
    del sd["model.blocks.1.norm.bias"]
    msg = _load_error(sd)
    assert "missing (1)" in msg and "model.blocks.1.norm.bias" in msg and "file.safetensors" in msg


def test_unexpected_key_is_named_unless_ignored():
    """Analytic: an extra key under the prefix fails; matching an `ignore` pattern it loads."""
    sd = _weights()
    sd["model.blocks.0.extra.weight"] = torch.zeros(1)
    msg = _load_error(sd)
    assert "unexpected (1)" in msg and "model.blocks.0.extra.weight" in msg
    with torch.device("meta"):
        net = Net()
    load_module(net, sd.__getitem__, sd.keys(), prefix="model.", ignore=["*.extra.*"])
    assert torch.equal(net.head.weight, sd["model.head.weight"])


def test_misshaped_key_is_named():
    """Analytic: one tensor with a transposed shape; the message gives both shapes."""
    sd = _weights()
    sd["model.blocks.0.proj.weight"] = torch.zeros(4, 3)
    msg = _load_error(sd)
    assert "wrong shape (1)" in msg and "model.blocks.0.proj.weight [4, 3] (model [3, 4])" in msg


def test_long_lists_are_truncated_with_counts():
    """Analytic: 30 missing keys are listed 20 by name, the other 10 counted."""
    with torch.device("meta"):
        net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(CheckpointError) as e:
        load_module(net, {}.__getitem__, [])
    msg = str(e.value)
    assert "missing (30)" in msg and "+10 more" in msg and msg.count("weight") + msg.count("bias") == 20


def test_meta_buffer_without_init_is_an_error():
    """Analytic: a non-persistent buffer that no init_buffers() recreates must not stay on meta silently."""

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    with torch.device("meta"):
        m = Bare()
    sd = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.ones(2)}
    with pytest.raises(CheckpointError, match="scratch"):
        load_module(m, sd.__getitem__, sd.keys())


# --- atomic save ----------------------------------------------------------------------------


@pytest.mark.parametrize("fail_in", ["write", "replace"])
def test_failed_save_keeps_old_file(tmp_path, monkeypatch, fail_in):
    """Reference: the old file is re-read with safetensors.torch.load_file after a write that dies midway."""
    path = str(tmp_path / "m.safetensors")
    old = {"a": torch.randn(8)}
    save_safetensors_atomic(old, path)

    if fail_in == "write":
        import core.fsio as fsio

        def broken_chunks(order):
            yield b"\x00" * 100  # partial output, then the disk fills up
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(fsio, "_st_chunks", broken_chunks)
    else:

        def broken_replace(src, dst):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(ckpt.os, "replace", broken_replace)

    with pytest.raises(OSError) as e:
        save_safetensors_atomic({"a": torch.zeros(8), "b": torch.ones(3)}, path)
    assert e.value.filename == path  # the error names the file, not a temporary
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert torch.equal(safetensors_torch.load_file(path)["a"], old["a"])


def test_bad_tensors_and_metadata_are_rejected(tmp_path):
    """Analytic: metadata values must be strings; meta tensors cannot be saved."""
    path = str(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="step"):
        save_safetensors_atomic({"a": torch.zeros(1)}, path, {"step": 3})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="meta"):
        save_safetensors_atomic({"a": torch.empty(1, device="meta")}, path)
    assert not os.path.exists(path)


# --- metadata and casting -------------------------------------------------------------------


def test_modelspec_metadata_fields():
    """Analytic: CONVENTIONS.md modelspec fields; date parses as ISO 8601."""
    import datetime

    meta = modelspec_metadata("stable-diffusion-v3-medium", "my run", "1024x1024", "flow", extra={"modelspec.author": "me"})
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v3-medium"
    assert meta["modelspec.title"] == "my run" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.prediction_type"] == "flow" and meta["modelspec.author"] == "me"
    datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert "modelspec.prediction_type" not in modelspec_metadata("a", "b", "512x512")
    with pytest.raises(ValueError, match="title"):
        modelspec_metadata("a", "", "512x512")


def test_cast_state_dict():
    """Analytic: float tensors take the dtype, integer tensors keep theirs, None changes nothing."""
    sd = {"w": torch.randn(2), "ids": torch.arange(3), "h": torch.randn(2).half()}
    out = cast_state_dict(sd, torch.bfloat16)
    assert out["w"].dtype == out["h"].dtype == torch.bfloat16 and out["ids"].dtype == torch.int64
    assert torch.equal(out["w"], sd["w"].to(torch.bfloat16))
    assert cast_state_dict(sd, None) == sd
