"""LoRA tools: resize, extract, merge, info (kohya's networks/resize_lora.py and extract_lora_from_models.py, ours).

    python -m tools.lora info LORA.safetensors
    python -m tools.lora resize LORA.safetensors --new_rank 8 [--dynamic_method sv_fro --dynamic_param 0.9] --save_to out.safetensors
    python -m tools.lora extract --model_org base.safetensors --model_tuned tuned.safetensors --dim 8 [--conv_dim 4] --save_to out.safetensors
    python -m tools.lora merge BASE.safetensors LORA.safetensors[:WEIGHT] ... --out merged.safetensors

resize: each LoRA / LoCon layer's product up @ down (alpha / dim kept as the scale) is cut by SVD to its best rank-r
approximation (Eckart-Young): rank `--new_rank`, or per layer by kohya's dynamic methods, capped at --new_rank:
  sv_ratio       keep the singular values larger than S[0] / param
  sv_cumulative  keep until sum(S[:r]) / sum(S) reaches param
  sv_fro         keep until sqrt(sum(S[:r]^2) / sum(S^2)) reaches param
with kohya's index rules (`networks/resize_lora.py` rank_resize / index_sv_*); the kept fractions (sum of S, Frobenius
norm) are reported per layer with --verbose and on average. LoHa / LoKr layers have no rank to cut and are refused;
a DoRA layer keeps its magnitude vector.
extract: for every layer our defaults adapt (LoCon's convolutions too with --conv_dim), the SVD of tuned - base to
rank --dim (alpha = dim), factors clamped to the --clamp_quantile quantile of their values (kohya's default 0.99; 1 =
no clamp); layers whose largest change is below --min_diff are left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from torch import Tensor

MIN_SV = 1e-6  # kohya resize_lora.py: a layer whose largest singular value is below this is a zero matrix


def kohya_rank(S: Tensor, new_rank: int, method: str | None, param: float | None) -> int:
    """The rank kohya's rank_resize keeps for singular values S (descending): the method's index + 1, capped at
    new_rank; 1 for a zero matrix."""
    n = len(S)
    if method == "sv_ratio":
        idx = int((S > S[0] / param).sum())
    elif method == "sv_cumulative":
        idx = int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), torch.tensor(param, dtype=S.dtype))) + 1
    elif method == "sv_fro":
        sq = S.pow(2)
        idx = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(param ** 2, dtype=S.dtype))) + 1
    else:
        return 1 if S[0] <= MIN_SV else new_rank
    rank = max(1, min(idx, n - 1)) + 1
    return 1 if S[0] <= MIN_SV else min(rank, new_rank)


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(up (out, r), down (r, in * k), S): the best rank-r factors of a 2-D matrix, S folded into up (as kohya). The
    SVD runs in float64: fp32's leaves errors of ~1e-5 of the largest entry (measured), float64's stay at fp32
    rounding."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]).float(), Vh[:rank].float(), S.float()


def product_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD (U, S, Vh) of up @ down (out, R) x (R, in) without forming it: QR of both factors, SVD of the R x R core
    (exact; costs R-sized work instead of out x in)."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    uc, S, vch = torch.linalg.svd(ru @ rd.T)
    return qu @ uc, S, vch @ qd.T


def resize(groups: dict[str, dict[str, Tensor]], new_rank: int, method: str | None = None, param: float | None = None,
           log: Any = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The resized file's tensors and {"sum": mean kept fraction of sum(S), "fro": of the Frobenius norm,
    "layers": n}. Each layer keeps its scale alpha / dim, so alpha_new = scale * r."""
    from networks.lycoris import algo_of
    out: dict[str, Tensor] = {}
    kept_sum, kept_fro = [], []
    for name, g in sorted(groups.items()):
        if algo_of(g) != "lora" or "lora_mid.weight" in g:
            raise ValueError(f"{name}: resize works on LoRA / LoCon layers (lora_down / lora_up); this one is "
                             f"{'Tucker LoCon' if 'lora_mid.weight' in g else algo_of(g)}")
        down, up = g["lora_down.weight"].float(), g["lora_up.weight"].float()
        dim = down.shape[0]
        scale = float(g["alpha"]) / dim if "alpha" in g else 1.0
        U, S, Vh = product_svd(up.flatten(1), down.flatten(1))  # of (out, in * kh * kw)
        S = S.float()
        r = min(kohya_rank(S, new_rank, method, param), len(S))
        new_up, new_down = (U[:, :r] * S[:r].double()).float(), Vh[:r].float()
        out[f"{name}.lora_up.weight"] = new_up.reshape(up.shape[0], r, *up.shape[2:]).contiguous()
        out[f"{name}.lora_down.weight"] = new_down.reshape(r, *down.shape[1:]).contiguous()
        out[f"{name}.alpha"] = torch.tensor(scale * r)
        if "dora_scale" in g:
            out[f"{name}.dora_scale"] = g["dora_scale"]
        s_sum = float(S[:r].sum() / S.sum()) if S.sum() > 0 else 1.0
        s_fro = float(S[:r].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()) if S.sum() > 0 else 1.0
        kept_sum.append(s_sum)
        kept_fro.append(s_fro)
        if log is not None:
            log(f"{name}: rank {dim} -> {r}, sum(S) kept {s_sum:.1%}, Frobenius kept {s_fro:.1%}")
    return out, {"sum": sum(kept_sum) / len(kept_sum), "fro": sum(kept_fro) / len(kept_fro), "layers": len(kept_sum)}


@torch.no_grad()
def extract(base: Any, tuned: Any, dim: int, conv_dim: int = 0, clamp_quantile: float = 0.99,
            min_diff: float = 0.01) -> dict[str, Tensor]:
    """kohya-layout LoRA tensors of tuned - base on the layers our defaults adapt (alpha = rank: scale 1)."""
    import re

    import models
    from networks.lora import lora_targets
    tb, tt = lora_targets(base), lora_targets(tuned)
    fam = models.family(base.family)
    linear, conv = list(fam.lora_targets), list(fam.lora_conv_targets) if conv_dim else []
    out: dict[str, Tensor] = {}
    for name, t in sorted(tb.items()):
        is_linear = any(re.fullmatch(p, name) for p in linear) and not t.is_3x3
        if not (is_linear or any(re.fullmatch(p, name) for p in conv)) or name not in tt:
            continue
        rank = conv_dim if t.is_3x3 else dim
        w0, w1 = t.weight, tt[name].weight
        if t.slot is not None:
            c = w0.shape[1]
            w0, w1 = w0[t.slot * c:(t.slot + 1) * c], w1[t.slot * c:(t.slot + 1) * c]
        diff = w1.float() - w0.float()
        if diff.abs().max() < min_diff:
            continue
        rank = min(rank, *diff.flatten(1).shape)
        up, down, _ = low_rank(diff.flatten(1), rank)
        if clamp_quantile < 1:
            values = torch.cat([up.flatten(), down.flatten()])
            hi = torch.quantile(values.abs()[:2 ** 24], clamp_quantile)  # torch.quantile's input limit
            up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        if diff.dim() == 4:
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(rank, *diff.shape[1:])
        out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = up.contiguous(), down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    if not out:
        raise ValueError(f"no adapted layer differs by {min_diff} or more: the same model twice?")
    return out


def info(path: str) -> str:
    """Layers by part and algorithm, ranks, alphas and the file's metadata, as lines of text."""
    from collections import Counter

    from models.checkpoint import SafeTensorFile
    from networks.lora import read_lora
    from networks.lycoris import algo_of
    groups = read_lora(path)
    f = SafeTensorFile(path)
    meta = f.metadata
    parts: Counter = Counter()
    ranks: Counter = Counter()
    for name, g in groups.items():
        algo = algo_of(g) + ("+dora" if "dora_scale" in g else "")
        parts[(name.split("_")[0] + "_" + name.split("_")[1], algo)] += 1
        r = next((v.shape[0] for k, v in g.items() if k in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")),
                 None)
        alpha = float(g["alpha"]) if "alpha" in g else None
        ranks[(r if r is not None else "full", alpha)] += 1
    n_tensors = sum(len(g) for g in groups.values())
    lines = [f"{path}: {len(groups)} layers, {n_tensors} tensors"]
    lines += [f"  {prefix}: {n} {algo} layers" for (prefix, algo), n in sorted(parts.items())]
    lines += [f"  rank {r}, alpha {a}: {n} layers" for (r, a), n in sorted(ranks.items(), key=str)]
    for k in sorted(meta or {}):
        v = meta[k]
        lines.append(f"  {k} = {v if len(v) <= 200 else v[:200] + '...'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="layers, ranks, algorithms and metadata of a LoRA / LyCORIS file")
    p.add_argument("lora")
    p = sub.add_parser("resize", help="SVD to a lower rank (kohya resize_lora.py)")
    p.add_argument("model", help="LoRA / LoCon file")
    p.add_argument("--new_rank", type=int, required=True, help="the rank (dynamic methods: the largest rank)")
    p.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"), default=None)
    p.add_argument("--dynamic_param", type=float, default=None, help="sv_ratio: > 1; sv_fro / sv_cumulative: in (0, 1]")
    p.add_argument("--save_to", required=True)
    p.add_argument("--save_precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--verbose", action="store_true", help="the rank and kept fractions of every layer")
    p = sub.add_parser("extract", help="a LoRA from a fine-tune minus its base (kohya extract_lora_from_models.py)")
    p.add_argument("--model_org", required=True)
    p.add_argument("--model_tuned", required=True)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--conv_dim", type=int, default=0, help="rank of the ResNet / sampling convolutions (LoCon); 0 = none")
    p.add_argument("--clamp_quantile", type=float, default=0.99)
    p.add_argument("--min_diff", type=float, default=0.01)
    p.add_argument("--save_to", required=True)
    p.add_argument("--save_precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    p = sub.add_parser("merge", help="merge into a checkpoint (tools.merge_lora)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"tools.lora {args.cmd}: {e}") from None


def _run(args: argparse.Namespace) -> int:
    import models
    from networks.lora import read_lora, save_lora
    if args.cmd == "merge":
        from tools import merge_lora
        return merge_lora.main(args.rest)
    if args.cmd == "info":
        print(info(args.lora))
        return 0
    if args.cmd == "resize":
        if args.dynamic_method and args.dynamic_param is None:
            raise ValueError("--dynamic_method needs --dynamic_param")
        if args.dynamic_method == "sv_ratio" and args.dynamic_param <= 1 or \
                args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
            raise ValueError(f"--dynamic_param {args.dynamic_param} is out of range for {args.dynamic_method}")
        from models.checkpoint import SafeTensorFile
        meta = dict(SafeTensorFile(args.model).metadata)
        sd, kept = resize(read_lora(args.model), args.new_rank, args.dynamic_method, args.dynamic_param,
                          log=print if args.verbose else None)
        dynamic = f"{args.dynamic_method}={args.dynamic_param}" if args.dynamic_method else None
        meta.update({"ss_network_dim": "Dynamic" if dynamic else str(args.new_rank),
                     "ss_network_alpha": "Dynamic" if dynamic else meta.get("ss_network_alpha", ""),
                     "ss_training_comment": f"resized by sdtrain tools.lora to rank {args.new_rank}"
                     + (f", {dynamic}" if dynamic else "")})
        save_lora(args.save_to, sd, meta, args.save_precision)
        print(f"{args.save_to}: {kept['layers']} layers, kept on average {kept['sum']:.1%} of sum(S), "
              f"{kept['fro']:.1%} of the Frobenius norm")
        return 0
    if os.path.abspath(args.model_org) == os.path.abspath(args.model_tuned):
        raise ValueError("--model_org and --model_tuned are the same file")
    base, tuned = models.load(args.model_org), models.load(args.model_tuned)
    if base.family != tuned.family:
        raise ValueError(f"{args.model_org} is {base.family}, {args.model_tuned} is {tuned.family}")
    sd = extract(base, tuned, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(args.dim), "ss_network_alpha": str(args.dim),
            "ss_network_args": json.dumps({"conv_dim": str(args.conv_dim), "conv_alpha": str(args.conv_dim)}
                                          if args.conv_dim else {}),
            "ss_base_model_version": models.family(base.family).base_model_version,
            "ss_training_comment": f"extracted by sdtrain tools.lora from {os.path.basename(args.model_tuned)} - "
                                   f"{os.path.basename(args.model_org)}"}
    save_lora(args.save_to, sd, meta, args.save_precision)
    print(f"{args.save_to}: {len({k.split('.')[0] for k in sd})} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
