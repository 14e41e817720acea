"""T5-XXL encoder and tokenizer: key contract, parity with transformers and with the HF fast tokenizer."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from models.t5 import EOS_ID, PAD_ID, PRESETS, T5Config, T5Encoder, T5Tokenizer, config_from_shapes

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# the real T5 v1.1 SentencePiece model (shared/reference/t5), shipped with the product as models/assets/t5_spiece.model
SPIECE = os.path.join(os.path.dirname(FIXTURES), "..", "models", "assets", "t5_spiece.model")
TOKENIZER_JSON = os.path.join(FIXTURES, "t5", "tokenizer.json")
SD3_PREFIX = "text_encoders.t5xxl.transformer."


def _load_keys(name: str) -> dict:
    with open(os.path.join(FIXTURES, "keys", name)) as f:
        return json.load(f)


def released_layouts() -> dict[str, dict[str, list[int]]]:
    sd3 = _load_keys("sd3_text_encoders.json")
    return {
        "sd3_single_file": {k[len(SD3_PREFIX) :]: v for k, v in sd3.items() if k.startswith(SD3_PREFIX)},
        "comfy_t5xxl_fp16": _load_keys("comfy_text_encoders.json")["t5xxl_fp16.safetensors"],
    }


# ---------------------------------------------------------------------------------------------
# Key contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sd3_single_file", "comfy_t5xxl_fp16"])
def test_key_contract_xxl_on_meta(layout: str) -> None:
    """Reference: key -> shape lists of the released files; conversion: strip `text_encoders.t5xxl.transformer.`."""
    ref = released_layouts()[layout]
    with torch.device("meta"):
        model = T5Encoder(PRESETS["xxl"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert ours == ref
    assert config_from_shapes(ref) == PRESETS["xxl"]
    # Tied embedding counted once: 4,762,310,656 = sum of the file's tensors minus embed_tokens.
    unique = sum(torch.Size(s).numel() for k, s in ref.items() if k != "encoder.embed_tokens.weight")
    assert sum(p.numel() for p in model.parameters()) == unique == 4_762_310_656


def test_tied_embedding_save_and_load() -> None:
    """Reference: the file layout (both keys, same values); loading a file that lacks one of them must work."""
    model = T5Encoder(PRESETS["tiny"])
    sd = model.state_dict()
    assert sd["shared.weight"].data_ptr() == sd["encoder.embed_tokens.weight"].data_ptr()
    other = T5Encoder(PRESETS["tiny"])
    only_shared = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    other.load_state_dict(only_shared, strict=True)
    torch.testing.assert_close(other.encoder.embed_tokens.weight, sd["shared.weight"], rtol=0, atol=0)
    only_embed = {k: v for k, v in sd.items() if k != "shared.weight"}
    T5Encoder(PRESETS["tiny"]).load_state_dict(only_embed, strict=True)


def test_bad_input_ids() -> None:
    """Reference: analytic vocabulary range."""
    model = T5Encoder(PRESETS["tiny"])
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[5, 40000]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------
# Numerical parity with transformers
# ---------------------------------------------------------------------------------------------


def _random_weights(model: T5Encoder) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _hf_model(cfg: T5Config, model: T5Encoder) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
    )
    ref = transformers.T5EncoderModel(hf_cfg).eval()
    result = ref.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys
    # Same names as HF: only the tied duplicate may be unexpected, depending on how HF registers it.
    assert set(result.unexpected_keys) <= {"encoder.embed_tokens.weight"}
    ref.get_input_embeddings().weight.data.copy_(model.shared.weight.data)
    return ref


def test_parity_with_transformers_fp32() -> None:
    """Reference: transformers T5EncoderModel (gated-gelu, T5 v1.1) with the same state dict, no attention mask.
    150 tokens > max_distance 128, so the exact, log-spaced and saturated buckets are all exercised."""
    cfg = PRESETS["tiny"]
    model = T5Encoder(cfg).eval()
    _random_weights(model)
    ref = _hf_model(cfg, model)
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    ids[1, 40:] = PAD_ID  # padded row: unmasked in both
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(input_ids=ids).last_hidden_state
    assert ours.shape == (2, 150, cfg.d_model)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_with_transformers_low_precision(dtype: torch.dtype) -> None:
    """Reference: transformers T5EncoderModel cast to the same dtype (fp16: same clamps and fp32 norms)."""
    cfg = PRESETS["tiny"]
    model = T5Encoder(cfg).eval()
    _random_weights(model)
    ref = _hf_model(cfg, model).to(dtype)
    model = model.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(input_ids=ids).last_hidden_state
    assert ours.dtype == dtype
    rel = (ours.float() - theirs.float()).norm() / theirs.float().norm()
    assert rel < 2e-2, f"relative error {rel:.2e}"


def test_fp16_overflow_is_clamped() -> None:
    """Reference: analytic fp16 range; huge FF weights overflow fp16 and must come out finite (HF behaviour)."""
    model = T5Encoder(PRESETS["tiny"]).eval()
    _random_weights(model)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():  # FF output ~1e6 > fp16 max 65504; without the clamp the next norm gives nan
        ff.wi_1.weight.mul_(1000)
        ff.wo.weight.mul_(1000)
    model = model.half()
    with torch.no_grad():
        out = model(torch.tensor([[3, 9, 1202, 13, EOS_ID]]))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Tokenizer parity with the HF fast tokenizer
# ---------------------------------------------------------------------------------------------

TAGS = (
    "1girl solo long_hair looking_at_viewer smile blue_eyes blonde_hair shirt holding_sword outdoors sky "
    "cloud day school_uniform absurdres highres masterpiece best_quality :d ^_^ >_< rating:safe artist:wlop "
    "(detailed_background:1.2) [lowres] score_9 score_8_up"
).split()
WORDS = (
    "a photo of the cat sitting on an old wooden bench beside quiet river at sunset with warm golden light "
    "cinematic 35mm f/1.8 portrait woman wearing red dress city street night neon reflections rain"
).split()
UNICODE = [
    "日本語のキャプション", "café crème brûlée", "naïve résumé", "Ω≈ç√∫", "😀🎨🔥",
    "ﬁne ﬂower", "①②③",
    "Straße", "Привет мир", "مرحبا", "\u3000full\u3000width", "tab\tand\nnewline", "non\u00a0breaking",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "e\u0301", "™ © ®", "—–…", "¼ ½",
]
SPECIAL = ["</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_99>", "<extra_id_7>"]


def varied_captions(n: int = 300) -> list[str]:
    rng = random.Random(0)
    caps = ["", " ", "   \n\t ", "a", "A B C", "  leading and trailing  ", "multiple    spaces", "x" * 300]
    while len(caps) < n:
        kind = rng.randrange(5)
        if kind == 0:
            caps.append(", ".join(rng.sample(TAGS, rng.randint(1, 20))))
        elif kind == 1:
            caps.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 400))) + rng.choice([".", "!", ""]))
        elif kind == 2:
            caps.append(" ".join(rng.choice(UNICODE + WORDS) for _ in range(rng.randint(1, 12))))
        elif kind == 3:
            caps.append(rng.choice(WORDS) + rng.choice(SPECIAL) + rng.choice(["", " "]) + rng.choice(TAGS))
        else:
            caps.append("".join(rng.choice("abc XYZ 0123456789,.;:!?'\"()[]{}<>/\\|_-+=*&^%$#@~`") for _ in range(60)))
    return caps


@pytest.fixture(scope="module")
def hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(TOKENIZER_JSON)


def test_token_ids_match_hf_fast_tokenizer(hf_tokenizer) -> None:
    """Reference: `tokenizers.Tokenizer.from_file(tokenizer.json)` (HF T5 fast tokenizer, appends </s>);
    conversion: none, ids compared exactly before padding."""
    ours = T5Tokenizer(SPIECE)
    caps = varied_captions()
    for cap in caps:
        assert ours.encode(cap) + [EOS_ID] == hf_tokenizer.encode(cap).ids, repr(cap)


def test_padding_and_truncation_layout(hf_tokenizer) -> None:
    """Reference: HF fast tokenizer with its own truncation (keeps </s> last) and the analytic layout:
    rows padded with 0 to max(min_length, longest row)."""
    ours = T5Tokenizer(SPIECE)
    caps = varied_captions()
    for min_length, max_length in [(77, 256), (77, 77), (8, 32)]:
        hf_tokenizer.enable_truncation(max_length=max_length)
        try:
            expected = [e.ids for e in hf_tokenizer.encode_batch(caps)]
        finally:
            hf_tokenizer.no_truncation()
        for start in range(0, len(caps), 50):
            batch, exp = caps[start : start + 50], expected[start : start + 50]
            ids = ours(batch, min_length=min_length, max_length=max_length)
            assert ids.dtype == torch.long
            assert ids.shape == (len(batch), max(min_length, max(len(e) for e in exp)))
            for row, e in zip(ids.tolist(), exp):
                assert row[: len(e)] == e and e[-1] == EOS_ID
                assert all(t == PAD_ID for t in row[len(e) :])
    assert ours(["a cat"]).shape == (1, 77)
    assert ours([" ".join(WORDS) * 20]).shape == (1, 256)


def test_tokenizer_bad_input() -> None:
    """Reference: the documented argument contract."""
    ours = T5Tokenizer(SPIECE)
    with pytest.raises(TypeError, match="sequence of str"):
        ours("a single string")
    with pytest.raises(ValueError, match="min_length"):
        ours(["x"], min_length=300, max_length=256)
    with pytest.raises(FileNotFoundError, match="spiece"):
        T5Tokenizer(os.path.join(FIXTURES, "t5", "missing.model"))


# ---------------------------------------------------------------------------------------------
# Attention mask (kohya's apply_t5_attn_mask)
# ---------------------------------------------------------------------------------------------


def test_parity_with_transformers_attention_mask() -> None:
    """Reference: transformers T5EncoderModel(input_ids, attention_mask) with the same state dict; conversion:
    none. Every position is compared (HF computes the padding queries too). The masked output must differ from
    the unmasked one (padding is attended to without the mask) and must not depend on how much padding follows."""
    cfg = PRESETS["tiny"]
    model = T5Encoder(cfg).eval()
    _random_weights(model)
    ref = _hf_model(cfg, model)
    ids = torch.randint(2, cfg.vocab_size, (3, 140), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for row, n in enumerate((140, 37, 5)):
        ids[row, n - 1] = EOS_ID
        ids[row, n:] = PAD_ID
        mask[row, n:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        unmasked = model(ids)
        short = model(ids[1:2, :60], attention_mask=mask[1:2, :60])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0], unmasked[0], rtol=1e-5, atol=1e-5)  # no padding: the mask changes nothing
    assert (ours[1, :37] - unmasked[1, :37]).abs().max() > 1e-3
    torch.testing.assert_close(short[0, :37], ours[1, :37], rtol=1e-5, atol=1e-5)


def test_attention_mask_for_padded_ids() -> None:
    """Reference: the HF tokenizer's attention_mask (1 for every token it produced, a literal `<pad>` included;
    0 for the padding it appended)."""
    from models.t5 import attention_mask_for

    tok = T5Tokenizer(SPIECE)
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5TokenizerFast(tokenizer_file=TOKENIZER_JSON)
    caps = ["a red circle", "word <pad> word", "", " ".join(WORDS)]
    ids = tok(caps, min_length=77, max_length=77)
    want = hf(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"])
    assert torch.equal(attention_mask_for(ids), want["attention_mask"].bool())


def test_attention_mask_bad_input() -> None:
    """Reference: the documented argument contract (mask shaped like the ids, at least one kept token per row)."""
    model = T5Encoder(PRESETS["tiny"])
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(torch.tensor([[5, 1]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="masks every token"):
        model(torch.tensor([[5, 1], [6, 1]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
