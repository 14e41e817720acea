"""Sample-prompt files (kohya sd-scripts formats), A1111 "parameters" text and PNG saving."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from core.fsio import atomic_write
from diffusion.sampling import A1111_NAMES, SIGMA_KINDS, canonical_sampler_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

if TYPE_CHECKING:
    import PIL.Image

log = logging.getLogger(__name__)


@dataclass
class SamplePrompt:
    """One preview / generation request."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    seed: int | None = None  # None: the caller picks one
    scale: float = 7.0  # classifier-free guidance scale
    steps: int = 28
    sampler: str = "euler"  # canonical diffusion.sampling name
    rescale: float = 0.0  # guidance rescale phi (Lin et al. 2023)
    index: int = 0  # position in the prompt file
    sigmas: str = "normal"  # sigma spacing: "normal" (the schedule's own) or "karras" (Karras et al. 2022)
    name: str = ""  # euge-trainer's sample_name: names the image files of this prompt ("" = none)

    def file_name(self, prefix: str) -> str:
        """`<prefix>_<index>_<seed>[_<name>].png` (the name made safe for any filesystem)."""
        safe = re.sub(r"[^\w.-]+", "_", self.name).strip("._")[:64]
        return f"{prefix}_{self.index}_{self.seed}{'_' + safe if safe else ''}.png"


FIELDS = tuple(f.name for f in dataclasses.fields(SamplePrompt) if f.name != "index")
# kohya sd-scripts keys of toml/json prompt tables -> our field names.
KEY_ALIASES = {"cfg_scale": "scale", "sample_steps": "steps", "sample_sampler": "sampler", "guidance_rescale": "rescale",
               "schedule_type": "sigmas", "use_karras_sigmas": "sigmas", "sample_name": "name"}
# kohya inline options of .txt prompt lines ("--w 1024") -> field names.
TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "steps",
               "ss": "sampler", "rescale": "rescale", "sigmas": "sigmas"}
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z_]+)(?=\s|$)")
# Upper limits, as ComfyUI's nodes take them (nodes.py MAX_RESOLUTION = 16384 for EmptyLatentImage's sides; KSampler
# steps max 10000): a typo such as `--w 99999999` is one line at start, not an allocator error at the first preview.
MAX_SIDE = 16384
MAX_STEPS = 10000


def _coerce(field: str, value: Any) -> Any:
    """Check / convert one field value; raises ValueError with the reason."""
    if field in ("prompt", "negative_prompt", "name"):
        if not isinstance(value, str):
            raise ValueError(f"{field!r} must be a string, got {value!r}")
        return value
    if field == "sigmas":
        if isinstance(value, bool):  # use_karras_sigmas = true (diffusers' option name)
            return "karras" if value else "normal"
        if not isinstance(value, str) or value.strip().lower() not in SIGMA_KINDS:
            raise ValueError(f"'sigmas' must be one of {', '.join(SIGMA_KINDS)}, got {value!r}")
        return value.strip().lower()
    if field == "sampler":
        if not isinstance(value, str):
            raise ValueError(f"'sampler' must be a string, got {value!r}")
        return canonical_sampler_name(value)
    if field in ("width", "height", "steps", "seed"):
        if field == "seed" and value is None:
            return None
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"{field!r} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{field!r} must be an integer, got {value!r}")
        if value < (0 if field == "seed" else 1):
            raise ValueError(f"{field!r} must be {'>= 0' if field == 'seed' else 'positive'}, got {value}")
        top = {"width": MAX_SIDE, "height": MAX_SIDE, "steps": MAX_STEPS}.get(field)
        if top is not None and value > top:
            raise ValueError(f"{field!r} {value} is larger than {top}, the most any preview or generation takes")
        return value
    # scale, rescale
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{field!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field!r} must be a finite number, got {value!r}")
    if field == "rescale" and not 0.0 <= value <= 1.0:
        raise ValueError(f"'rescale' must be in [0, 1], got {value}")
    return float(value)


def _coerce_at(field: str, value: Any, where: str) -> Any:
    """_coerce, its error prefixed with where the value came from."""
    try:
        return _coerce(field, value)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _normalize(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map aliases to field names and check every value; unknown keys are an error."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        field = KEY_ALIASES.get(key, key)
        if field not in FIELDS:
            allowed = ", ".join(list(FIELDS) + list(KEY_ALIASES))
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {allowed}")
        if field in out:
            raise ValueError(f"{where}: {field!r} given twice (as {key!r} and an alias)")
        out[field] = _coerce_at(field, value, where)
    return out


def _parse_line(line: str, where: str) -> dict[str, Any]:
    """A kohya prompt line: '<prompt> --n <negative> --w 1024 --h 1024 --d 1 --l 7 --s 28 --ss euler'."""
    matches = list(_OPTION.finditer(line))
    fields: dict[str, Any] = {"prompt": line[: matches[0].start()].strip() if matches else line.strip()}
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = m.group(1)
        value = line[m.end() : nxt.start() if nxt else len(line)].strip()
        if name not in TXT_OPTIONS:
            allowed = ", ".join(f"--{k}" for k in TXT_OPTIONS)
            raise ValueError(f"{where}: unknown option --{name}; allowed: {allowed}")
        field = TXT_OPTIONS[name]
        if not value:
            raise ValueError(f"{where}: option --{name} needs a value")
        if field in fields:
            raise ValueError(f"{where}: option --{name} given twice")
        fields[field] = _coerce_at(field, value, f"{where}: --{name}")
    return fields


def read_text(path: str) -> str:
    """A prompt file's text: UTF-8 with or without a byte-order mark (Windows editors write one), or UTF-16 with
    its mark (Notepad's "Unicode"); anything else is one line naming the file and the line."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-16 text ({e.reason} at byte {e.start})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _tables(path: str) -> list[Mapping[str, Any]]:
    """The prompt tables of a .toml / .json file (our `prompts = [...]` or kohya's `[prompt]` + `[[prompt.subset]]`)."""
    text = read_text(path)
    try:
        data: Any = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid {os.path.splitext(path)[1][1:]}: {e}") from None
    if isinstance(data, dict) and set(data) == {"prompts"}:
        data = data["prompts"]
    elif isinstance(data, dict) and set(data) == {"prompt"} and isinstance(data["prompt"], dict):
        shared = dict(data["prompt"])  # kohya: [prompt] holds shared values, [[prompt.subset]] the prompts
        subsets = shared.pop("subset", None)
        if not isinstance(subsets, list):
            raise ValueError(f"{path}: a [prompt] table needs a [[prompt.subset]] list")
        data = [{**shared, **s} if isinstance(s, dict) else s for s in subsets]
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of prompt tables (`prompts = [...]`, a top-level json list, "
            f"{{\"prompts\": [...]}}, or kohya's [prompt] with [[prompt.subset]])"
        )
    for i, t in enumerate(data):
        if not isinstance(t, dict):
            raise ValueError(f"{path}: prompt {i + 1} must be a table/object, got {t!r}")
    return data


def load_prompts(path: str, defaults: Mapping[str, object] | None = None, multiple: int = 8) -> list[SamplePrompt]:
    """Read sample prompts from a .txt (kohya inline options), .toml or .json file.

    `defaults` (e.g. the config's sample_params) fill fields a prompt does not set. Width and height are
    rounded down to `multiple` (8 for the VAE; 16 for patch-2 MMDiT latents) with a logged note.
    """
    base = _normalize(defaults or {}, "sample defaults")
    if "prompt" in base:
        raise ValueError("sample defaults: 'prompt' cannot have a default")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give a prompt file (.txt, .toml or .json)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    entries: list[tuple[str, dict[str, Any]]] = []
    if path.endswith(".txt"):
        for lineno, raw in enumerate(read_text(path).split("\n"), 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                where = f"{path}:{lineno}"
                entries.append((where, _parse_line(line, where)))
    elif path.endswith((".toml", ".json")):
        for i, table in enumerate(_tables(path)):
            where = f"{path}: prompt {i + 1}"
            fields = _normalize(table, where)
            if "prompt" not in fields:
                raise ValueError(f"{where}: missing 'prompt'")
            entries.append((where, fields))
    else:
        raise ValueError(f"{path}: unsupported prompt file type; use .txt, .toml or .json")
    if not entries:
        raise ValueError(f"{path}: no prompts in the file (every line is empty or a # comment)"
                         if path.endswith(".txt") else f"{path}: the prompt list is empty")

    prompts = []
    for index, (where, fields) in enumerate(entries):
        p = SamplePrompt(**{**base, **fields}, index=index)
        for side in ("width", "height"):
            size = getattr(p, side)
            if size < multiple:
                raise ValueError(f"{where}: {side} {size} is smaller than the minimum {multiple}")
            if size % multiple:
                log.warning("%s: %s %d rounded down to %d (a multiple of %d)", where, side, size,
                            size - size % multiple, multiple)
                setattr(p, side, size - size % multiple)
        prompts.append(p)
    return prompts


def _a1111_value(value: str) -> str:
    """Quote a value the way A1111 does when it would break the 'key: value, ...' list."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',\n:"') else value


def a1111_parameters(p: SamplePrompt, model_name: str = "", extra: Mapping[str, str] | None = None,
                     model_hash: str = "") -> str:
    """The A1111 "parameters" PNG text: prompt, 'Negative prompt: ...', then 'Steps: 28, Sampler: Euler, ...'.
    `model_hash`: A1111's 10-hex short hash of the model file (core.hashes.short_hash), before `Model` as A1111
    orders them."""
    items = {
        "Steps": str(p.steps),
        "Sampler": A1111_NAMES.get(p.sampler, p.sampler),
    }
    if p.sigmas == "karras":
        items["Schedule type"] = "Karras"  # A1111's infotext name for the sigma spacing
    items["CFG scale"] = f"{p.scale:g}"
    if p.seed is not None:
        items["Seed"] = str(p.seed)
    items["Size"] = f"{p.width}x{p.height}"
    if model_hash:
        items["Model hash"] = model_hash
    if model_name:
        items["Model"] = model_name
    if p.rescale:
        items["CFG Rescale phi"] = f"{p.rescale:g}"  # the name A1111's CFG-rescale extension writes
    items.update(extra or {})
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {_a1111_value(str(v))}" for k, v in items.items()))
    return "\n".join(lines)


def save_png(image: "PIL.Image.Image", path: str, parameters: str) -> None:
    """Write a PNG with a "parameters" text chunk atomically (temporary file, fsync, rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)  # tEXt; PIL switches to iTXt for non-latin-1 text
    # our recognisable temporary (core/fsio.py), removed on failure; a killed run's is cleaned at the next start
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), suffix=".png")
