"""Model-file hashes as AUTOMATIC1111's webui computes them (modules/hashes.py, modules/sd_models.py), which
Civitai and A1111 use to link images and trainings to a model file."""
from __future__ import annotations

import hashlib

BLOCK = 1024 * 1024  # A1111 reads in 1 MiB blocks
SHORT_HASH_LEN = 10  # "Model hash: <10 hex>" in the PNG infotext ("AutoV2")
LEGACY_OFFSET, LEGACY_LEN = 0x100000, 0x10000  # sd_models.model_hash: 64 KiB at 1 MiB ("AutoV1", 8 hex)


def sha256_file(path: str) -> str:
    """sha256 of the whole file, hex (A1111 hashes.calculate_sha256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def short_hash(path: str) -> str:
    """The 10-hex model hash A1111 writes as `Model hash:` (first 10 hex digits of the file's sha256)."""
    return sha256_file(path)[:SHORT_HASH_LEN]


def model_hash_legacy(path: str) -> str:
    """A1111's old model hash (sd_models.model_hash), also kohya's ss_sd_model_hash."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        h.update(f.read(LEGACY_LEN))
    return h.hexdigest()[:8]
