"""Image folders with same-stem caption files: plain folders (euge-trainer / ours) and kohya DreamBooth folders.

Plain folders: key = file stem, caption = the whole caption file, stripped (euge-trainer reads it so).
DreamBooth (kohya `train_data_dir` / `reg_data_dir`, expanded into one subset per `<repeats>_<class tokens>`
folder by `dreambooth_subsets`): key = `<folder>/<stem>` (train and reg folders often share stems), caption = the
first line of `<stem><ext>` (or of the face-crop base name's file, as kohya's `read_caption` tries; `ext` defaults to
kohya's `.caption`), and an image without one gets the folder's class tokens; a file whose first line is empty
gives '' (kohya DreamBoothDataset: class tokens only when there is no file).
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

from ..images import IMAGE_EXTENSIONS
from ..latent_files import LATENT_EXT, classify_npz, is_latent_file
from ..listing import list_images, map_chunked, walk_images
from ..locators import stat_sig
from .base import CHUNK, Reader, Rows, Source, register

log = logging.getLogger(__name__)

CAPTION_EXTENSIONS = (".txt", ".caption")  # kohya's default is .caption, everyone else's .txt
PROBE = 2000  # missing caption files checked for another extension


def read_text(path: str, first_line: bool = False) -> str | None:
    """The caption file's text, stripped (its first line only with first_line); None when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return (f.readline() if first_line else f.read()).strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path!r} is not UTF-8: {e}") from None


def kohya_caption_paths(image_path: str, ext: str) -> list[str]:
    """kohya `read_caption`: `<stem><ext>`, then the name without the 4 face-crop suffix fields (`a_b_c_d_e`)."""
    base = os.path.splitext(image_path)[0]
    out = [base + ext]
    tokens = base.split("_")
    if len(tokens) >= 5:
        out.append("_".join(tokens[:-4]) + ext)
    return out


def warn_other_extension(missing: list[str], total: int, ext: str, where: str) -> None:
    """When caption files with `ext` are missing, say so once if another common extension has them."""
    if not missing:
        return
    probe = missing[:PROBE]
    for alt in CAPTION_EXTENSIONS + (".tags",):
        if alt == ext:
            continue
        hits = sum(os.path.exists(os.path.splitext(p)[0] + alt) for p in probe)
        if hits:
            more = f" (of {len(probe)} checked)" if len(missing) > len(probe) else ""
            log.warning("%s: %d of %d images have no %s caption file, but %d%s have a %s file; set "
                        "caption_extension = \"%s\" to use them", where, len(missing), total, ext, hits, more, alt, alt)
            return


@register
class DreamBoothReader(Reader):
    """kohya DreamBooth subsets (from train_data_dir / reg_data_dir): kohya's key and caption rules."""

    name = "kohya-dreambooth"

    def claims(self, src: Source) -> bool:
        return src.kind == "folders" and src.spec.layout == "dreambooth"

    def fingerprint(self, src: Source, h) -> None:
        _folder_fingerprint(src, h)

    def read(self, src: Source, subset_index: int, threads: int) -> Iterator[Rows]:
        s = src.spec
        files = [p for p, _, _ in list_images(s.image_dirs, False, threads)]
        missing: list[str] = []

        def caption(p: str) -> str | None:
            for c in kohya_caption_paths(p, s.caption_extension):
                t = read_text(c, first_line=True)
                if t is not None:
                    return t
            return None

        texts = map_chunked(caption, files, threads, 256)
        missing = [p for p, t in zip(files, texts) if t is None]
        if missing:
            log.info("%s: %d of %d images have no %s caption; the class tokens %r are used for them",
                     s.image_dirs[0], len(missing), len(files), s.caption_extension, s.class_tokens)
            warn_other_extension(missing, len(files), s.caption_extension, s.image_dirs[0])
            # kohya (DreamBoothDataset): no caption file -> the class tokens; a file whose first line is empty -> ''
            texts = [s.class_tokens if t is None else t for t in texts]
        folder = os.path.basename(s.image_dirs[0])
        prefix = ("reg/" if s.is_reg else "") + folder + "/"
        yield from _file_rows(files, texts, prefix, subset_index)


@register
class FolderReader(Reader):
    """Plain image folders: key = stem, caption = the whole same-stem caption file."""

    name = "folder"

    def claims(self, src: Source) -> bool:
        return src.kind == "folders"

    def fingerprint(self, src: Source, h) -> None:
        _folder_fingerprint(src, h)

    def read(self, src: Source, subset_index: int, threads: int) -> Iterator[Rows]:
        s = src.spec
        listed = walk_images(s.image_dirs, src.recursive, threads, stat=False, exts=IMAGE_EXTENSIONS + (LATENT_EXT,))
        files = latents_in_place([p for p, _, _ in listed])
        if not src.recursive:
            warn_subfolders(s.image_dirs, len(files), threads)
        caps = [_base(p) + s.caption_extension for p in files]
        texts = map_chunked(read_text, caps, threads, 256)
        warn_other_extension([p for p, t in zip(files, texts) if t is None], len(files), s.caption_extension,
                             ", ".join(s.image_dirs))
        yield from _file_rows(files, texts, "", subset_index)


def _has_subfolder(d: str) -> bool:
    with os.scandir(d) as it:
        return any(e.is_dir(follow_symlinks=True) for e in it)


def warn_subfolders(dirs: list[str], top: int, threads: int) -> int:
    """Without data.recursive only the folders' own images are read; euge-trainer lists image_dirs recursively
    (sdxl_dataset_utils.Dataset: listdir(..., recur=True)). One warning with the count of images left in subfolders
    and the option that reads them; returns that count."""
    if not any(map(_has_subfolder, dirs)):
        return 0
    deeper = len(walk_images(dirs, True, threads, stat=False)) - top
    if deeper:
        log.warning("%s: %d images in subfolders are not used (%d are); set data.recursive = true to train on them "
                    "(euge-trainer reads image_dirs recursively)", ", ".join(dirs), deeper, top)
    return deeper


def latents_in_place(paths: list[str]) -> list[str]:
    """Images, and the `.npz` latent caches that stand in place of an image (euge-trainer's layout b: "use the npz
    cache files in place of the images"): a cache whose base name has no image beside it (a `_flip.npz` only goes
    with its main file; of a `<base>.npz` and a `<base>_<W>x<H>_<arch>.npz` the latter, as data/npz_import reads it).
    Sorted by path."""
    images = [p for p in paths if not is_latent_file(p)]
    have = {os.path.splitext(p)[0] for p in images}
    best: dict[str, str] = {}
    for p in paths:
        c = classify_npz(os.path.basename(p)) if is_latent_file(p) else None
        if c is None or c[1] == "flip":
            continue
        base = os.path.join(os.path.dirname(p), c[0])
        if base not in have and (base not in best or c[1] == "strategy"):
            best[base] = p
    return sorted(images + list(best.values()))


def _base(path: str) -> str:
    """An image path without its extension; a latent cache's without its cache suffix (its caption's stem)."""
    c = classify_npz(os.path.basename(path)) if is_latent_file(path) else None
    return os.path.join(os.path.dirname(path), c[0]) if c is not None else os.path.splitext(path)[0]


def _file_rows(files: list[str], texts: list[str | None], prefix: str, si: int) -> Iterator[Rows]:
    """Rows of image (or latent) files: key = prefix + base name, caption = the text ('' for none), sizes from the
    headers later."""
    for a in range(0, len(files), CHUNK):
        part = files[a : a + CHUNK]
        n = len(part)
        yield Rows(keys=[prefix + os.path.basename(_base(p)) for p in part], paths=part,
                   captions=[t or "" for t in texts[a : a + CHUNK]], metadata=[{} for _ in part],
                   widths=[-1] * n, heights=[-1] * n, subset=[si] * n, origin=part)


def _folder_fingerprint(src: Source, h) -> None:
    s = src.spec
    recursive = src.recursive and s.layout != "dreambooth"
    exts = IMAGE_EXTENSIONS + (LATENT_EXT,) if s.layout != "dreambooth" else IMAGE_EXTENSIONS
    for p, size, mt in list_images(s.image_dirs, recursive, exts=exts):
        h.update(f"{p}:{size}:{mt}:{stat_sig(os.path.splitext(p)[0] + s.caption_extension)}".encode())


def dreambooth_subsets(root: str, is_reg: bool) -> list[tuple[str, int, str]]:
    """(folder, repeats, class tokens) of each `<repeats>_<class tokens>` folder under root, sorted by name
    (kohya `generate_dreambooth_subsets_config_by_subdirs`); a folder without a leading number is skipped with a
    warning, one with repeats < 1 silently, as kohya does."""
    out = []
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if e.is_dir(follow_symlinks=True))
    for name in names:
        head, _, tokens = name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            log.warning("%s: ignoring folder %r: its name does not start with <repeats>_ (e.g. 10_sks dog)",
                        root, name)
            continue
        if repeats >= 1:
            out.append((os.path.join(root, name), repeats, tokens))
    if not out:
        kind = "reg_data_dir" if is_reg else "train_data_dir"
        raise ValueError(f"{kind} {root!r} has no <repeats>_<class tokens> folders (kohya layout: "
                         f"{root}/10_sks dog/*.png)")
    return out


__all__ = ["IMAGE_EXTENSIONS", "dreambooth_subsets", "read_text"]
