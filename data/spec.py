"""A subset as the data code sees it: `SubsetSpec`, every [data] fallback resolved, and its `CaptionOptions`.

data/sources.py builds them from the typed config (core/config.py `DataConfig` / `SubsetConfig`); the readers,
the index and the loader read their fields directly. A leaf module: it imports nothing from data/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings (subset values with [data] fallbacks resolved)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    class_tokens: str = ""
    description_probability: float = 0.5
    description_with_tags_probability: float = 0.0

    @property
    def augmented(self) -> bool:
        """Whether the caption can differ between epochs."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0


@dataclass
class SubsetSpec:
    """A subset with every [data] fallback resolved (plain values, picklable, saved in the dataset index)."""

    image_dirs: list[str]
    metadata_files: list[str]
    caption_extension: str
    num_repeats: int
    is_reg: bool
    class_tokens: str
    flip_aug: bool
    random_crop: bool
    loss_weight: float
    caption: dict[str, Any] = field(default_factory=dict)  # CaptionOptions fields (`caption_options`)
    layout: str = ""                                       # "dreambooth": a kohya <repeats>_<tokens> folder
    dataset_name_or_path: str = ""                         # a local Hugging Face dataset (parquet / arrow)
    dataset_image_column: str = ""
    dataset_caption_column: str = ""
    tar_shards: list[str] = field(default_factory=list)    # webdataset tar shards (patterns expanded, absolute)
    bucket: dict[str, Any] = field(default_factory=dict)   # its own BucketSettings fields ({}: [data]'s)
    source: int = 0                                        # which [[data.subsets]] entry it comes from

    @property
    def caption_options(self) -> CaptionOptions:
        """The subset's caption settings, typed."""
        return CaptionOptions(**self.caption)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (the dataset index file, fingerprints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubsetSpec":
        """A spec saved by `to_dict` (fields added later take their defaults)."""
        return cls(**d)

    def where(self) -> str:
        """Where the subset's entries come from, for messages (its first folder / file / dataset / shard)."""
        return (self.image_dirs or self.metadata_files or self.tar_shards or [self.dataset_name_or_path])[0]
