"""CLIP tokenizer: token ids against open_clip and Hugging Face oracles, kohya long-prompt layout."""

from __future__ import annotations

import gzip
import random

import pytest
import torch

from models.tokenizers import EOT, SOT, CLIPTokenizer, default_vocab_path

TAGS = [
    "1girl", "solo", "long hair", "looking at viewer", "smile", "blue eyes", "thighhighs", "hatsune miku",
    "masterpiece", "best quality", "score_9", "from_side", ":d", "^_^", "o_o", "2b (nier:automata)",
    "\\(artist\\)", "\\(cosplay\\)", "(red eyes:1.2)", "((detailed))", "[blurry]", "{bow}", "<lora:x:0.8>",
    "absurdres", "highres", "rating:safe", "c.c.", "k-on!", "re:zero", "@_@", "#hashtag", "50%", "3d",
]
WORDS = (
    "a photo of the cat dog sitting on table in garden with sunlight beautiful landscape mountain river "
    "it's don't we're they've I'm you'll he'd Running JUMPING quickly 12345 3.14 v2.0 e-mail x-ray"
).split()
SPECIAL = [
    "",
    " ",
    "\t\n  \r\n",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp; &nbsp;x",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe \u0130stanbul \u03a3\u03bf\u03c6\u03af\u03b1",
    "caf\u00c3\u00a9 mojibake",  # ftfy repairs this to "café"
    "\u201ccurly quotes\u201d and \u2018single\u2019",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \uff11\uff12\uff13",  # fullwidth
    "\u65e5\u672c\u8a9e\u306e\u30ad\u30e3\u30d7\u30b7\u30e7\u30f3\u3001\u732b\u304c\u5ea7\u3063\u3066\u3044\u308b\u3002",
    "\u4e2d\u6587\u6807\u9898 \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940",
    "emoji \U0001f600\U0001f431\U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f \U0001f1ef\U0001f1f5",
    "ligature \ufb01sh \ufb02ower",
    "control\x00chars\x07here\x1b[31mred\x1b[0m",
    "MiXeD CaSe TEXT with    many     spaces",
]


def _captions(n: int = 300, seed: int = 0) -> list[str]:
    """Varied captions: booru tags, weights/escapes, natural language (some > 77 tokens), unicode, specials."""
    rng = random.Random(seed)
    pool = TAGS + WORDS
    out = list(SPECIAL)
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:  # booru tag list
            out.append(", ".join(rng.choice(TAGS) for _ in range(rng.randint(1, 40))))
        elif kind == 1:  # long natural language
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 140))) + ".")
        elif kind == 2:  # mixture with a special piece
            out.append(f"{rng.choice(SPECIAL)} {' '.join(rng.choice(pool) for _ in range(rng.randint(1, 30)))}")
        else:  # random unicode code points from several blocks
            blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
            chars = []
            for _ in range(rng.randint(1, 60)):
                lo, hi = rng.choice(blocks)
                chars.append(chr(rng.randint(lo, hi)))
            out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return _captions()


def test_vocab_file_is_open_clips(tok: CLIPTokenizer) -> None:
    """Reference: open_clip.tokenizer.default_bpe() (open_clip's copy of OpenAI CLIP's vocabulary): our bundled file
    holds the same bytes, and the special ids agree."""
    octok = pytest.importorskip("open_clip.tokenizer")
    with open(default_vocab_path(), "rb") as ours, open(octok.default_bpe(), "rb") as theirs:
        assert ours.read() == theirs.read()
    assert (octok._tokenizer.sot_token_id, octok._tokenizer.eot_token_id) == (SOT, EOT)
    assert tok.encoder == octok._tokenizer.encoder


def test_runtime_needs_neither_open_clip_nor_ftfy_until_it_cleans_text(monkeypatch) -> None:
    """The GPU image has neither (scripts/download_wheels.sh carries ftfy): building the tokenizer needs no package
    beyond regex; the first cleaning asks for ftfy with one clear line."""
    import sys

    from models import tokenizers

    monkeypatch.setitem(sys.modules, "ftfy", None)  # `import ftfy` raises ImportError
    monkeypatch.setitem(sys.modules, "open_clip", None)
    tokenizers._fix_text.cache_clear()
    try:
        t = CLIPTokenizer()
        assert len(t.encoder) == 49408
        with pytest.raises(ImportError, match="needs ftfy"):
            t.encode("a photo")
    finally:
        tokenizers._fix_text.cache_clear()


def test_matches_open_clip_tokenize(tok: CLIPTokenizer, captions: list[str]) -> None:
    """Reference: open_clip.tokenize (bigG convention: pad 0, truncation forcing EOT last); no conversion."""
    open_clip = pytest.importorskip("open_clip")
    expected = open_clip.tokenize(captions)
    got = tok(captions, pad_token=0)
    assert got.dtype == torch.long and got.shape == (len(captions), 77)
    for i, caption in enumerate(captions):
        assert got[i].tolist() == expected[i].tolist(), repr(caption)
    # The test set must exercise truncation and the empty caption.
    n_ids = [len(tok.encode(c)) for c in captions]
    assert max(n_ids) > 150 and min(n_ids) == 0


def test_encode_matches_open_clip_simple_tokenizer(tok: CLIPTokenizer, captions: list[str]) -> None:
    """Reference: open_clip.tokenizer.SimpleTokenizer.encode (untruncated BPE ids); no conversion."""
    octok = pytest.importorskip("open_clip.tokenizer")
    oracle = octok.SimpleTokenizer()
    for caption in captions:
        assert tok.encode(caption) == oracle.encode(caption), repr(caption)


def _hf_clip_tokenizer():
    """transformers CLIPTokenizer built from open_clip's bpe file the way HF's vocab.json/merges.txt are laid out."""
    transformers = pytest.importorskip("transformers")
    octok = pytest.importorskip("open_clip.tokenizer")
    with gzip.open(octok.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(octok.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def test_matches_transformers_clip_tokenizer(tok: CLIPTokenizer, captions: list[str]) -> None:
    """Reference: transformers CLIPTokenizer (CLIP-L convention: pad 49407, padding="max_length", truncation)
    built from open_clip's bpe file. transformers 5 has only the fast tokenizer, which normalises with NFC
    instead of ftfy/html-unescape, so its input is pre-cleaned with open_clip's own `_clean_lower`."""
    octok = pytest.importorskip("open_clip.tokenizer")
    hf = _hf_clip_tokenizer()
    cleaned = [octok._clean_lower(c) for c in captions]
    expected = hf(cleaned, padding="max_length", max_length=77, truncation=True).input_ids
    got = tok(captions)  # pad_token defaults to EOT
    for i, caption in enumerate(captions):
        assert got[i].tolist() == expected[i], repr(caption)


def _kohya_layout(ids: list[int], max_token_length: int, pad: int) -> list[int]:
    """Independent re-statement of kohya-ss sd-scripts train_util `get_input_ids` for max_token_length 150/225.

    The HF tokenizer call there is `padding="max_length", truncation=True, max_length=max_token_length + 2`:
    SOT + ids[:max_token_length] + EOT, padded with `pad`. Then 77-blocks are cut at i = 1, 76, 151 as
    `[full[0]] + full[i:i+75] + [full[-1]]`; when pad != EOT, a block whose second-to-last entry is text gets
    EOT last, and a block starting `SOT pad` becomes `SOT EOT pad`.
    """
    length = max_token_length + 2
    full = [SOT, *ids[:max_token_length], EOT]
    full += [pad] * (length - len(full))
    blocks = []
    for i in range(1, length - 77 + 2, 75):
        block = [full[0], *full[i : i + 75], full[-1]]
        if pad != EOT:
            if block[-2] != EOT and block[-2] != pad:
                block[-1] = EOT
            if block[1] == pad:
                block[1] = EOT
        blocks += block
    return blocks


@pytest.mark.parametrize("max_token_length", [150, 225])
@pytest.mark.parametrize("pad", [EOT, 0])
def test_long_prompt_layout_matches_kohya(tok: CLIPTokenizer, max_token_length: int, pad: int) -> None:
    """Reference: a re-statement of kohya's chunking rule (see _kohya_layout) applied to open_clip
    SimpleTokenizer.encode ids; edge lengths around every 75-token boundary, for pad 0 and pad 49407."""
    octok = pytest.importorskip("open_clip.tokenizer")
    oracle = octok.SimpleTokenizer()
    # "a" is a single token (320), so "a " * n has exactly n tokens; add mixed captions too.
    lengths = [0, 1, 2, 73, 74, 75, 76, 77, 148, 149, 150, 151, 152, 223, 224, 225, 226, 227, 300]
    texts = [" ".join(["a"] * n) for n in lengths] + _captions(60, seed=1)
    got = tok(texts, pad_token=pad, max_token_length=max_token_length)
    assert got.shape == (len(texts), max_token_length // 75 * 77)
    for i, text in enumerate(texts):
        assert got[i].tolist() == _kohya_layout(oracle.encode(text), max_token_length, pad), repr(text[:80])


def test_long_prompt_pad0_edge_cases_explicit(tok: CLIPTokenizer) -> None:
    """Analytic expectations for pad 0 (kohya SDXL tokenizer 2): an empty chunk keeps EOT after SOT; a chunk
    ending exactly at 75 tokens gets EOT in its last slot and the next chunk starts SOT EOT."""
    a = 320  # id of "a</w>"
    out = tok([" ".join(["a"] * 75), ""], pad_token=0, max_token_length=150).tolist()
    assert out[0][:77] == [SOT] + [a] * 75 + [EOT]
    assert out[0][77:] == [SOT, EOT] + [0] * 75
    assert out[1] == ([SOT, EOT] + [0] * 75) * 2


def test_bad_arguments(tok: CLIPTokenizer) -> None:
    """Analytic: invalid max_token_length / pad / text types raise errors that name what is allowed."""
    for bad in (77, 100, 0, 300):
        with pytest.raises(ValueError, match=r"75, 150, 225"):
            tok(["x"], max_token_length=bad)
    with pytest.raises(ValueError, match="pad_token"):
        tok(["x"], pad_token=49408)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["x", None])  # type: ignore[list-item]
    assert tok("single string").shape == (1, 77)
    assert tok([]).shape == (0, 77)
