"""log.wandb: the rows written to metrics.jsonl reach a wandb run (offline mode: read back from its .wandb file)."""
from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from core.config import Config
from core.metrics import MetricsWriter, wandb_run

pytest.importorskip("wandb")

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records with a 7-byte header each
_FULL, _LAST = 1, 4


def wandb_records(path: str) -> list:
    """The protobuf records of an offline run's .wandb file (its ':W&B' header, then LevelDB log records: crc32,
    length, type; FIRST / MIDDLE / LAST pieces joined). Written here because wandb no longer ships a reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, out, parts = 7, [], b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def wandb_history(log_dir: str) -> list[dict]:
    """The logged rows (history records) of the one offline run under log_dir/wandb, wandb's own keys removed."""
    files = glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    rows = []
    for rec in wandb_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}  # flat
            rows.append({k: v for k, v in row.items() if k not in ("_runtime", "_timestamp")})
    return rows


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def test_metrics_writer_rows_reach_wandb(tmp_path, offline):
    cfg = Config()
    cfg.log.wandb, cfg.log.wandb_mode, cfg.log.wandb_tags = True, "offline", ["t1"]
    run = wandb_run(cfg.log, str(tmp_path / "run-a"), "20260101-000000-abc", {"seed": 1})
    assert run is not None and run.name == "run-a"
    log_dir = str(tmp_path / "logs")
    os.makedirs(log_dir)
    w = MetricsWriter(log_dir, enabled=True, tensorboard=False, wandb=run)
    rows = [{"loss": 0.5, "lr": 1e-4, "epoch": 0}, {"loss": 0.25, "lr": 1e-4, "epoch": 0, "val/loss": 0.3}]
    for step, row in enumerate(rows, start=1):
        w.write(step, row)
    grid = tmp_path / "p_000002_grid.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(grid)
    w.write_images(2, [str(grid)])
    w.close()

    by_step = {h["_step"]: h for h in wandb_history(log_dir)}  # wandb merges what one step logs into one row
    assert sorted(by_step) == [1, 2]
    for step, row in enumerate(rows, start=1):
        assert {k: by_step[step][k] for k in row} == row
    assert by_step[2]["samples/grid/_type"] == "image-file" and by_step[2]["samples/grid/width"] == 8
    jsonl = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    assert [{k: v for k, v in r.items() if k not in ("step", "time")} for r in jsonl] == rows


def test_missing_wandb_is_one_line(monkeypatch):
    import builtins

    from core.metrics import check_wandb

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="pip install wandb"):
        check_wandb()
