"""CLIP byte-level BPE tokenizer (OpenAI CLIP / open_clip), shared by CLIP-L and bigG / CLIP-G.

Token ids equal open_clip's `SimpleTokenizer` (the tokenizer bigG was trained with) and Hugging Face's
`CLIPTokenizer` on the same vocabulary for cleaned text. The only difference between the CLIP-L and
bigG conventions in SDXL / SD3 is the padding token (49407 vs 0), see `CLIPTokenizer.__call__`;
`CLIPTokenizer.layouts` lays out both paddings from one encoding.

Speed (one CPU core, pure Python, 10-40-tag booru captions, warm BPE cache): about 15k captions/s for
`__call__` (~1-2 minutes per million captions, ~2.5x open_clip's SimpleTokenizer); about half of the time is
ftfy.fix_text, BPE itself is mostly word-cache hits.

The vocabulary is bundled (models/assets/bpe_simple_vocab_16e6.txt.gz, byte-identical to the file OpenAI CLIP and
open_clip ship, MIT licence), so open_clip is not needed at run time. ftfy is: its `fix_text` is the cleaning open_clip
and the original CLIP tokenizer apply (mojibake repair, ligatures, character widths), and token ids must match theirs;
it is imported at the first tokenization, so runs that only read cached text-encoder outputs do not need it.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Callable, Sequence

import regex
import torch

# Special tokens: the last two entries of the CLIP vocabulary (49408 = 512 byte tokens + 48894 merges + 2).
SOT, EOT = 49406, 49407
VOCAB_SIZE = 49408
# Merges used by CLIP: lines 1 .. 49152-256-2 of bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP simple_tokenizer.py).
NUM_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77  # CLIP's position-embedding length
CHUNK_TOKENS = CONTEXT_LENGTH - 2  # text tokens per 77-block (SOT and EOT take two)
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya-ss sd-scripts --max_token_length choices (None = 75)
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_BUNDLED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", _VOCAB_FILE)
# Pre-tokenization pattern of open_clip (its special-token strings first, then OpenAI CLIP's rule).
_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL_WORDS = {"<start_of_text>": (SOT,), "<end_of_text>": (EOT,)}
_PAD_SLOT = -1  # placeholder for padding positions, filled with each pad token in `layouts`
_CACHE_MAX = 1 << 20  # words; cleared when full (caption vocabularies repeat heavily)


def default_vocab_path() -> str:
    """Path of the bundled CLIP BPE file (the same bytes as open_clip's and OpenAI CLIP's)."""
    if not os.path.isfile(_BUNDLED_VOCAB):
        raise FileNotFoundError(f"{_BUNDLED_VOCAB} is missing (part of the repository); pass CLIPTokenizer(vocab_path=...)")
    return _BUNDLED_VOCAB


@functools.cache
def _fix_text() -> Callable[[str], str]:
    """ftfy.fix_text, imported once at the first tokenization (a clear error where ftfy is missing)."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("CLIP tokenization needs ftfy (pip install ftfy), the text cleaning open_clip applies") from None
    return ftfy.fix_text


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map of the 256 byte values to printable characters (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Non-printable bytes (space, controls, ...) are shifted past Latin-1 so no symbol is whitespace.
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy.fix_text, html.unescape twice, whitespace collapse, lower-case."""
    text = html.unescape(html.unescape(_fix_text()(text))).strip()
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """CLIP BPE on the bundled vocabulary (bpe_simple_vocab_16e6.txt.gz), with kohya's long-prompt layout."""

    def __init__(self, vocab_path: str | None = None) -> None:
        path = vocab_path or default_vocab_path()
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not a CLIP BPE merges file (expected {NUM_MERGES} pair lines after a header)")
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(f"{path}: vocabulary has {len(self.encoder)} distinct tokens, expected {VOCAB_SIZE}")
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        # utf-8 bytes (read as latin-1 so each byte is one char) -> CLIP's printable byte characters.
        self._byte_table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- BPE -------------------------------------------------------------------------------------

    def _bpe(self, chars: str) -> list[str]:
        """Merge the byte characters of one pre-token by merge rank; the last symbol carries '</w>'."""
        word = [*chars[:-1], chars[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, NUM_MERGES))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-token, cached."""
        ids = self._cache.get(word)
        if ids is None:
            if word in _SPECIAL_WORDS:
                ids = _SPECIAL_WORDS[word]
            else:
                chars = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
                ids = tuple(self.encoder[s] for s in self._bpe(chars))
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned text, without SOT/EOT and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        for word in _PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of encode up to cleaning (for debugging and previews)."""
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        data = bytes(byte_decoder[c] for c in "".join(self.decoder[int(i)] for i in ids))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    # -- batch layout ----------------------------------------------------------------------------

    def __call__(
        self, texts: Sequence[str] | str, pad_token: int = EOT, max_token_length: int = 75
    ) -> torch.LongTensor:
        """-> [B, (max_token_length // 75) * 77] token ids.

        Text ids are truncated to max_token_length and split into 75-token chunks; every chunk becomes one
        77-block `SOT + chunk + EOT + pad...`, also when the chunk is empty (SOT EOT pad...). For 75 this is
        the usual CLIP layout (= open_clip.tokenize for pad 0, HF padding="max_length" for pad 49407); for
        150/225 it equals kohya-ss sd-scripts `get_input_ids` for both pad conventions (pad 49407: CLIP-L;
        pad 0: bigG / CLIP-G). Encode each 77-block separately and concatenate on the token axis.
        """
        return self.layouts(texts, (pad_token,), max_token_length)[0]

    def layouts(
        self, texts: Sequence[str] | str, pad_tokens: Sequence[int], max_token_length: int = 75
    ) -> list[torch.LongTensor]:
        """One `__call__` layout per pad token, each caption cleaned and BPE-encoded once (SDXL / SD3 need
        both the CLIP-L (49407) and the bigG / CLIP-G (0) padding of the same captions)."""
        if max_token_length not in MAX_TOKEN_LENGTHS:
            raise ValueError(f"max_token_length={max_token_length!r}; allowed: {MAX_TOKEN_LENGTHS}")
        for pad_token in pad_tokens:
            if isinstance(pad_token, bool) or not isinstance(pad_token, int) or not 0 <= pad_token < VOCAB_SIZE:
                raise ValueError(f"pad_token={pad_token!r}; must be a token id in 0..{VOCAB_SIZE - 1} (49407 or 0)")
        if isinstance(texts, str):
            texts = [texts]
        n_chunks = max_token_length // CHUNK_TOKENS
        rows: list[list[int]] = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be str, got {type(text).__name__}")
            ids = self.encode(text)[:max_token_length]
            out: list[int] = []
            for k in range(n_chunks):
                block = [SOT, *ids[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS], EOT]
                out += block + [_PAD_SLOT] * (CONTEXT_LENGTH - len(block))
            rows.append(out)
        slots = torch.tensor(rows, dtype=torch.long).reshape(len(rows), n_chunks * CONTEXT_LENGTH)
        return [slots.masked_fill(slots == _PAD_SLOT, pad_token) for pad_token in pad_tokens]


@functools.cache
def default_tokenizer() -> CLIPTokenizer:
    """The tokenizer on the bundled vocabulary, built once per process: every SDXL / SD3 component
    set shares it (and its word cache) instead of re-reading the vocabulary file."""
    return CLIPTokenizer()
