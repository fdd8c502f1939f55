"""Layer-wise fitting machinery shared by the methods that fit each layer on its own inputs.

Bit-Split (``ptq.bitsplit``) and TSQ's transformation learning (``qat.tsq``) both solve, per
output channel, a least-squares problem on sampled input patches of one layer. This module holds
what they share: a conv layer seen as a conv2d over a (possibly transformed) 4-D input
(``conv_geometry``), patch rows of sampled output positions (``patch_rows``), weight rows that
multiply them (``weight_rows`` / ``rows_to_weight``), the scale group of each row, the Gram
statistics of a layer (``layer_statistics``) and a fixed random subset of positions
(``sample_index``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.layers import layer_kind, out_channels


@dataclass(frozen=True)
class ConvGeometry:
    """A conv layer as a 2-D convolution over a 4-D (possibly transformed) input.

    Conv1d is a conv2d over ``N x C x 1 x L``; ConvTranspose2d is its equivalent direct
    convolution: the input with ``stride - 1`` zeros inserted between samples, padded by
    ``dilation * (k - 1) - padding`` (plus ``output_padding`` at the end; negative pads crop),
    convolved at stride 1 with the flipped kernel whose in / out axes are swapped per group.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom
    mode: str
    groups: int


def _same_pads(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) padding of ``padding="same"``: the odd extra on the far side, as torch does."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return [(t // 2, t - t // 2) for t in totals]


def conv_geometry(layer: nn.Module, x: Tensor) -> tuple[Tensor, ConvGeometry]:
    """The 4-D input and geometry of ``layer`` (Conv1d, Conv2d or ConvTranspose2d) seen as a conv2d."""
    kind = layer_kind(layer)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    if kind.transposed:
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        (ph, pw), (oh, ow) = layer.padding, layer.output_padding
        n, c, h, w = x.shape
        if sh > 1 or sw > 1:
            z = x.new_zeros(n, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
            z[:, :, ::sh, ::sw] = x
            x = z
        top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        return x, ConvGeometry((kh, kw), (1, 1), (dh, dw), (left, left + ow, top, top + oh), "constant", layer.groups)
    if kind.spatial == 1:
        (k,), (s,), (d,) = layer.kernel_size, layer.stride, layer.dilation
        if isinstance(layer.padding, str):
            (pl, pr), = _same_pads((k,), (d,)) if layer.padding == "same" else [(0, 0)]
        else:
            pl = pr = layer.padding[0]
        return x.unsqueeze(2), ConvGeometry((1, k), (1, s), (1, d), (pl, pr, 0, 0), mode, layer.groups)
    if isinstance(layer.padding, str):
        (pt, pb), (pl, pr) = (_same_pads(layer.kernel_size, layer.dilation) if layer.padding == "same"
                              else [(0, 0), (0, 0)])
    else:
        (pt, pl), pb, pr = layer.padding, layer.padding[0], layer.padding[1]
    return x, ConvGeometry(tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation), (pl, pr, pt, pb),
                           mode, layer.groups)


def _out_hw(g: ConvGeometry, h: int, w: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    pl, pr, pt, pb = g.pads
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _is_conv(layer: nn.Module) -> bool:
    return layer_kind(layer).spatial > 0


def output_positions(layer: nn.Module, x: Tensor) -> int:
    """Number of output positions per image (1 for linear layers)."""
    if not _is_conv(layer):
        return 1
    x4, g = conv_geometry(layer, x)
    ho, wo = _out_hw(g, x4.shape[-2], x4.shape[-1])
    return ho * wo


def patch_rows(layer: nn.Module, x: Tensor, positions: Tensor | None) -> Tensor:
    """``K x rows x D`` input rows per conv group: the patches at ``positions`` (N x P flat output
    indices; None = all) for convs, the inputs themselves for linear layers. Patch columns follow
    ``weight_rows``: input channel, then kernel position."""
    if not _is_conv(layer):
        return x.reshape(-1, x.shape[-1]).unsqueeze(0)
    x, g = conv_geometry(layer, x)
    n, cin, h, w = x.shape
    ho, wo = _out_hw(g, h, w)
    xp = F.pad(x, g.pads, mode=g.mode) if any(g.pads) else x
    hp, wp = xp.shape[-2:]
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    if positions is None:
        positions = torch.arange(ho * wo, device=x.device).expand(n, -1)
    p = positions.shape[1]
    oh, ow = positions // wo, positions % wo
    offs = (torch.arange(kh, device=x.device) * dh).view(kh, 1) * wp + (torch.arange(kw, device=x.device) * dw).view(1, kw)
    idx = ((oh * sh) * wp + ow * sw).unsqueeze(-1) + offs.reshape(1, 1, -1)  # N x P x kk
    cols = xp.reshape(n, cin, hp * wp).gather(2, idx.reshape(n, 1, -1).expand(n, cin, -1))
    rows = cols.reshape(n, cin, p, kh * kw).permute(0, 2, 1, 3).reshape(n * p, cin * kh * kw)
    return rows.reshape(n * p, g.groups, -1).permute(1, 0, 2)


def weight_rows(layer: nn.Module, w: Tensor) -> Tensor:
    """``K x C x D`` rows of ``w`` (layer layout) that multiply ``patch_rows``: one row per output
    channel, ``K`` conv groups (ConvTranspose2d: the flipped kernel of its equivalent convolution)."""
    kind = layer_kind(layer)
    if kind.spatial == 0:
        return w.reshape(1, w.shape[0], -1)
    g = layer.groups
    if kind.transposed:
        cin, cpg = w.shape[0], w.shape[1]
        return w.reshape(g, cin // g, cpg, *w.shape[2:]).transpose(1, 2).flip(-2, -1).reshape(g, cpg, -1)
    return w.reshape(g, w.shape[0] // g, -1)


def rows_to_weight(layer: nn.Module, rows: Tensor) -> Tensor:
    """Inverse of ``weight_rows``: ``K x C x D`` rows back in the layer's weight layout."""
    kind = layer_kind(layer)
    shape = layer.weight.shape
    if not kind.transposed:
        return rows.reshape(shape)
    g, cpg = layer.groups, shape[1]
    return rows.reshape(g, cpg, shape[0] // g, *shape[2:]).flip(-2, -1).transpose(1, 2).reshape(shape)


def scale_group_of_rows(layer: nn.Module) -> Tensor:
    """Scale-group index of every row of ``weight_rows`` (output channel order, K-major)."""
    wq = layer.weight_quant
    rep = wq.channels // wq.num_groups
    channel = torch.arange(out_channels(layer), device=layer.weight.device) % wq.channels  # ConvTranspose: dim 1
    return channel // rep


@torch.no_grad()
def layer_statistics(layer: nn.Module, x_fp: Tensor, x_q: Tensor, samples: int, seed: int, device: torch.device,
                     dtype: torch.dtype, chunk: int = 256) -> dict[str, Tensor]:
    """Gram matrices A = Xq^T Xq, cross term Xfp^T Xq and column means over sampled patch rows."""
    n = len(x_fp)
    gen = torch.Generator().manual_seed(seed)
    total_pos = output_positions(layer, x_fp[:1])
    per_image = total_pos if samples == 0 else max(1, min(total_pos, -(-samples // n)))
    A = cross = sum_fp = sum_q = None
    rows_seen = 0
    for i in range(0, n, chunk):
        xf = x_fp[i:i + chunk].to(device)
        xq = xf if x_q is x_fp else x_q[i:i + chunk].to(device)
        pos = None
        if _is_conv(layer) and per_image < total_pos:
            pos = torch.rand(len(xf), total_pos, generator=gen).argsort(1)[:, :per_image].to(device)
        rf = patch_rows(layer, xf, pos).float()
        rq = rf if xq is xf else patch_rows(layer, xq, pos).float()
        # float32 products summed in float64: fast, and accurate enough for the exact fit after
        a = torch.bmm(rq.transpose(1, 2), rq).to(dtype)
        c = a if rq is rf else torch.bmm(rf.transpose(1, 2), rq).to(dtype)
        sf, sq = rf.sum(1).to(dtype), rq.sum(1).to(dtype)
        A = a if A is None else A + a
        cross = c if cross is None else cross + c
        sum_fp = sf if sum_fp is None else sum_fp + sf
        sum_q = sq if sum_q is None else sum_q + sq
        rows_seen += rf.shape[1]
    return {"A": A, "cross": cross, "mean_fp": sum_fp / rows_seen, "mean_q": sum_q / rows_seen}


def sample_index(numel: int, seed: int, limit: int = 1 << 18) -> Tensor:
    """A fixed random subset of positions (all of them when small) for scale fitting."""
    if numel <= limit:
        return torch.arange(numel)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, numel, (limit,), generator=gen)
    return idx
