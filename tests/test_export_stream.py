"""Streamed .safetensors export: header first, then one tensor at a time (models/checkpoint.py).

Read back by the safetensors library itself; a failed write leaves no temp file and the old file untouched; the
peak host memory of exporting a 'sharded' model (tensors materialised one at a time by the gather hook, as
FSDP2's full_tensor does) stays below one block, not the model."""
import os
import threading
import time
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.checkpoint import CheckpointError, StreamedSafetensorsWriter, save_safetensors_streamed

MB = 1 << 20


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    sd = {"b.weight": torch.randn(3, 5), "a.half": torch.randn(7).to(torch.bfloat16), "ids": torch.arange(77)[None],
          "scalar": torch.tensor(4.6052), "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False, True]),
          "t": torch.randn(4, 6).t()}  # non-contiguous
    path = str(tmp_path / "m.safetensors")
    save_safetensors_streamed(sd, path, metadata={"modelspec.title": "m", "ss_steps": "3"})
    back = load_file(path)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(sd) and f.metadata() == {"modelspec.title": "m", "ss_steps": "3"}
    # cast on the way out: floating-point tensors only
    save_safetensors_streamed(sd, path, dtype=torch.float16)
    back = load_file(path)
    assert back["b.weight"].dtype == torch.float16 and torch.equal(back["b.weight"], sd["b.weight"].half())
    assert back["ids"].dtype == torch.int64 and back["mask"].dtype == torch.bool


def test_streamed_writer_refuses_disorder_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_safetensors_streamed({"old": torch.ones(2)}, path)
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    for bad in ([("b", torch.zeros(3))], [("a", torch.zeros(3))], [("a", torch.zeros(2))]):
        with pytest.raises(CheckpointError):
            with StreamedSafetensorsWriter(path, specs) as w:
                for k, v in bad:
                    w.write(k, v)
        assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind
        assert torch.equal(load_file(path)["old"], torch.ones(2))  # the old file untouched
    with pytest.raises(CheckpointError, match="meta"):
        save_safetensors_streamed({"a": torch.empty(2, device="meta")}, path)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the RSS")
def test_streamed_export_peak_memory_is_one_block_not_the_model(tmp_path):
    # 8 blocks x 4 tensors x 4 MB fp32 = 128 MB "model", sharded: nothing materialised until gathered
    blocks, per_block, numel = 8, 4, MB
    shards = {f"blocks.{b}.w{i}": torch.empty(numel, device="meta") for b in range(blocks) for i in range(per_block)}
    block_bytes = per_block * numel * 4
    alive, peak_alive = [0], [0]

    def gather(t):  # stands in for DTensor.full_tensor: a new full fp32 tensor per call
        full = torch.full(t.shape, 0.5)
        alive[0] += 1
        peak_alive[0] = max(peak_alive[0], alive[0])
        weakref.finalize(full, lambda: alive.__setitem__(0, alive[0] - 1))
        return full

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    path = str(tmp_path / "big.safetensors")
    base = _rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        save_safetensors_streamed(shards, path, dtype=torch.float16, gather=gather)
    finally:
        stop.set()
        sampler.join()
    header = os.path.getsize(path) - len(shards) * numel * 2
    grown = peak[0] - base
    print(f"export of {len(shards) * numel * 4 / MB:.0f} MB fp32 -> fp16: peak RSS +{grown / MB:.1f} MB, "
          f"largest block {block_bytes / MB:.0f} MB, header {header} bytes")
    assert peak_alive[0] == 1  # one gathered tensor at a time
    assert grown <= block_bytes + header, f"peak RSS grew {grown / MB:.1f} MB (one block is {block_bytes / MB:.0f} MB)"
    with safe_open(path, "pt") as f:
        assert len(list(f.keys())) == len(shards) and torch.equal(f.get_tensor("blocks.7.w3")[:3], torch.full((3,), 0.5).half())
