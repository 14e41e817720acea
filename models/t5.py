"""T5 v1.1 encoder (T5-XXL of SD3/SD3.5) and its SentencePiece tokenizer.

Module attribute names equal the Hugging Face keys used by both SD3 layouts: `text_encoders.t5xxl.transformer.*`
inside SD3 single files and the unprefixed ComfyUI `t5xxl_fp16.safetensors`. Both files store
`encoder.embed_tokens.weight` next to `shared.weight` (tied), so `state_dict()` returns both keys
(the same tensor); loading accepts a file that has only one of the two.

Attention mask: optional, off by default. The SD3 reference (sd3.5 `other_impls.py` T5Stack) feeds the
padded ids without a mask, so text tokens also attend to the padding; the released MMDiTs were trained on
that. `forward(ids, attention_mask)` masks padding keys in every self-attention as HF T5EncoderModel does
with its `attention_mask` (kohya's `apply_t5_attn_mask`); queries at padding positions are still computed.

fp16: T5-XXL activations overflow fp16. As in Hugging Face T5, RMS norms compute in fp32, the gated
FF output is cast to `wo`'s dtype (keep `wo` in fp32 for fp16 inference) and hidden states are
clamped to the fp16 range after each sub-layer. bf16 needs none of this.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention

# T5 v1.1 layer-norm eps (HF T5Config.layer_norm_epsilon).
LAYER_NORM_EPS = 1e-6
# SentencePiece ids fixed by the T5 vocabulary (spiece.model / tokenizer.json).
PAD_ID = 0
EOS_ID = 1
# HF T5 tokenizers append 100 sentinel tokens `<extra_id_N>` = id 32099 - N after the 32000 pieces.
NUM_EXTRA_IDS = 100


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder hyperparameters, names as in HF T5Config."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


PRESETS: dict[str, T5Config] = {
    "xxl": T5Config(),
    "tiny": T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> list[int]:
    if key not in shapes:
        raise KeyError(f"T5 checkpoint lacks '{key}' (keys are expected without 'text_encoders.t5xxl.transformer.')")
    return list(shapes[key])


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> T5Config:
    """Derive the config from checkpoint key -> shape (HF names, no file prefix)."""
    emb_key = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab_size, d_model = _shape(shapes, emb_key)
    num_buckets, num_heads = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner, _ = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight")
    if inner % num_heads:
        raise ValueError(f"q width {inner} is not divisible by {num_heads} heads")
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")}
    if layers != set(range(len(layers))):
        raise ValueError(f"encoder blocks are not contiguous from 0: {sorted(layers)}")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=_shape(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        num_layers=len(layers),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
    )


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def clamp_fp16(x: Tensor) -> Tensor:
    """HF T5's fp16 guard: clamp to the finite range (a bit inside it once an inf appeared)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; statistics in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + LAYER_NORM_EPS)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets: half per direction, exact below num_buckets/4, log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    # clamp(min=1) only avoids log(0) in the branch that torch.where discards for small distances.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Self-attention without 1/sqrt(d) scaling (folded into the init); block 0 owns the position bias."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def compute_bias(self, length: int, device: torch.device) -> Tensor:
        """Position bias [1, heads, L, L] from key position minus query position."""
        pos = torch.arange(length, device=device)
        cfg = self.cfg
        bucket = relative_position_bucket(  # [L, L]: key position minus query position
            pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        return rearrange(self.relative_attention_bias(bucket), "q k h -> 1 h q k")

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, D], bias [1 or B, H, L, L] (position bias plus the additive key mask, if any)."""
        h = self.cfg.num_heads
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=h) for f in (self.q, self.k, self.v))
        out = attention(q, k, v, mask=bias.to(q.dtype), scale=1.0)  # [B, H, L, d]
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention (`layer.0`)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # Lets `wo` stay in fp32 while the rest runs in fp16 (HF keeps it so for the same overflow).
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward (`layer.1`)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention then feed-forward, each clamped for fp16."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    """The `encoder.*` part: blocks and the final norm (embed_tokens is set by T5Encoder)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """A clear error for ids outside the vocabulary, where checking is free: host ids. On a GPU reading the ids back
    would stall every step (there an id out of range fails in the embedding lookup instead)."""
    if input_ids.device.type == "cpu" and input_ids.numel() and \
            (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        raise ValueError(f"token ids must be in [0, {vocab_size}), got [{lo}, {hi}]")


class T5Encoder(nn.Module):
    """T5 v1.1 encoder returning the last hidden state after the final layer norm."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)
        # Tied: the same module under both names, so both keys are saved as in the original files.
        self.encoder.embed_tokens = self.shared
        self._register_load_state_dict_pre_hook(self._fill_tied_embedding)

    @staticmethod
    def _fill_tied_embedding(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Accept files that store only one of `shared.weight` / `encoder.embed_tokens.weight`."""
        shared, embed = prefix + "shared.weight", prefix + "encoder.embed_tokens.weight"
        if shared in state_dict and embed not in state_dict:
            state_dict[embed] = state_dict[shared]
        elif embed in state_dict and shared not in state_dict:
            state_dict[shared] = state_dict[embed]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, T] (+ attention_mask [B, T], 1/True = real token) -> hidden states [B, T, d_model].
        Without a mask every token attends to every token, padding included (SD3 reference)."""
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {list(input_ids.shape)}"
            )
        _check_token_ids(input_ids, self.cfg.vocab_size)
        x = self.encoder.embed_tokens(input_ids)  # [B, T, D]
        bias = self.encoder.block[0].layer[0].SelfAttention.compute_bias(input_ids.shape[1], input_ids.device)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                                 f"got {list(attention_mask.shape)}")
            keep = attention_mask.to(device=bias.device, dtype=torch.bool)
            if not keep.any(dim=1).all():
                raise ValueError("attention_mask masks every token of a row; at least the EOS token must be kept")
            # Additive key mask with the dtype's most negative finite value, as HF's extended attention mask.
            neg = torch.finfo(bias.dtype).min
            bias = bias + torch.where(keep, 0.0, neg).to(bias.dtype)[:, None, None, :]  # [B, H, T, T]
        for block in self.encoder.block:
            x = block(x, bias)  # [B, T, D]
        return self.encoder.final_layer_norm(x)


def attention_mask_for(input_ids: Tensor) -> Tensor:
    """Bool mask [B, T] of the real tokens: every position up to and including the row's last non-pad id
    (the appended EOS), so a literal `<pad>` inside a caption (id 0) stays unmasked, as HF's tokenizer marks it."""
    real = input_ids != PAD_ID
    return real.flip(1).cummax(dim=1).values.flip(1)  # True from the start through the last real token


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class T5Tokenizer:
    """SentencePiece (`sentencepiece` library) on a user-given spiece.model; no start token; EOS (1) appended;
    padded with 0 to at least `min_length` (77, SD3 reference) and truncated to `max_length` keeping EOS last.

    Like the HF T5 tokenizer the SD3 reference uses, the literal strings `<pad>`, `</s>`, `<unk>` and
    `<extra_id_N>` in a caption are read as their special ids; the text between them is encoded by
    SentencePiece segment by segment.
    """

    def __init__(self, spiece_path: str) -> None:
        import sentencepiece  # imported here so the model file stays importable without it

        if not os.path.isfile(spiece_path):
            raise FileNotFoundError(f"T5 SentencePiece model not found: {spiece_path!r} (expected spiece.model)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=spiece_path)
        n = self.sp.get_piece_size()
        self.specials = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.specials.update({f"<extra_id_{k}>": n + NUM_EXTRA_IDS - 1 - k for k in range(NUM_EXTRA_IDS)})
        if self.specials.get("</s>") != EOS_ID or self.specials.get("<pad>") != PAD_ID:
            raise ValueError(f"{spiece_path!r} is not a T5 vocabulary (expected </s>=1, <pad>=0)")
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption without EOS or padding."""
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.specials[part])
            elif part.strip():
                ids.extend(self.sp.encode(part))
        return ids

    def __call__(self, texts: Sequence[str], min_length: int = 77, max_length: int = 256) -> Tensor:
        """Captions -> LongTensor [B, L], L = max(min_length, longest row); rows longer than max_length are cut
        to max_length - 1 pieces + EOS. Padding to the batch's longest row (not to max_length) keeps short
        batches short; since T5 runs unmasked, padding a caption differently changes its embedding, so callers
        that cache embeddings should encode each caption alone (length max(min_length, own length))."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("T5Tokenizer expects a sequence of str (wrap a single caption in a list)")
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got min_length={min_length} max_length={max_length}")
        rows = [self.encode(t)[: max_length - 1] + [EOS_ID] for t in texts]
        length = max([min_length] + [len(r) for r in rows])
        padded = [r + [PAD_ID] * (length - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), length)
