"""GGUF K-quant quantizers (Q4_K, Q5_K, Q6_K) in plain numpy.

The ``gguf`` package can write F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 but only *reads* the K-quants, so the
three K-quants used by the usual presets are produced here. The decoder that our bytes must satisfy is
``gguf.quants.dequantize`` (and llama.cpp itself, which uses the same layouts).

Formats. A row is cut into super-blocks of ``QK_K = 256`` consecutive values; each super-block is
stored on its own:

* **Q4_K** (144 bytes, 4.5 bits/value): eight sub-blocks of 32 values. A value decodes as
  ``d*sc[j]*q - dmin*m[j]`` with ``q`` in 0..15, ``sc[j]``/``m[j]`` 6-bit integers per sub-block and
  ``d``/``dmin`` float16 per super-block. Bytes: ``d`` (f16), ``dmin`` (f16), 12 bytes of packed
  scales/mins, then 128 bytes of nibbles.
* **Q5_K** (176 bytes, 5.5 bits/value): as Q4_K with ``q`` in 0..31; the fifth bit of every value
  lives in a 32-byte ``qh`` field between the scales and the nibbles.
* **Q6_K** (210 bytes, 6.5625 bits/value): sixteen sub-blocks of 16 values, symmetric: a value
  decodes as ``d*sc[j]*(q - 32)`` with ``q`` in 0..63 and ``sc[j]`` a signed byte. Bytes: 128 bytes
  of low nibbles ``ql``, 64 bytes of high bit pairs ``qh``, 16 signed scales, then ``d`` (f16).

The exact bit placement of each field is described by the ``_pack_*`` helpers below.

Algorithm (the same shape as llama.cpp's reference quantizers, written independently):

1. Fit each sub-block on its own in float: for Q4_K/Q5_K an asymmetric ``scale*q - offset`` fit
   (offset >= 0, i.e. the grid starts at ``min(x, 0)``) chosen among a small grid of candidate
   scales around ``(max - min)/nmax``, each refined by weighted least squares (weights
   ``rms + |x|``, which favour the large values); for Q6_K a symmetric scale chosen among candidates
   around ``max|x|/32``, refined by least squares with weights ``x**2``.
2. Quantize the per-sub-block scales (and Q4_K/Q5_K offsets) against one float16 super-block
   factor: 6-bit unsigned multiples for Q4_K/Q5_K, int8 multiples for Q6_K. The factor is rounded
   *up* to float16 so no integer scale is ever clipped.
3. Requantize every value with the *quantized* scales (nearest level, clipped to the grid), trying
   each sub-block scale rounded down and rounded up and keeping whichever gives the smaller squared
   error, so the stored integers are the best ones for what the decoder will actually use.

Guaranteed error (derived in the docstrings of :func:`quantize_q4_k` and :func:`quantize_q6_k`),
per value of sub-block j: Q4_K/Q5_K ``|x - x_hat| <= span_j/nmax + nmax*d + dmin`` with
``span_j = max(x_j) - min(min(x_j), 0)`` and nmax = 15/31; Q6_K ``|x - x_hat| <= max|x_j|/32 + 32*|d|``.
Measured on standard-normal data (RMSE / std): Q4_K 0.071, Q5_K 0.035, Q6_K 0.0176, against 0.086
for Q4_0 and 0.043 for Q5_0 at the same sizes.

Everything is vectorized over all sub-blocks of a chunk of rows (~64k values at a time, to stay in
cache); the only Python loops are over chunks and over the handful of candidate scales.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

# Values handled per vectorized step: big enough that numpy's per-call overhead vanishes,
# small enough that the temporaries stay in the CPU cache.
_CHUNK_VALUES = 1 << 16

# Candidate grids, as (offset of the first candidate from nmax, step, number of steps).
# llama.cpp's reference uses the same kind of grid: 21 candidates for 4 bits, 16 for 5 bits.
_GRID_Q4K = (-1.0, 0.1, 20)
_GRID_Q5K = (-0.5, 0.1, 15)
# Q6_K: candidates nmax + 0.1*k for k in -9..9 (the plain max-abs scale is k = 0).
_GRID_Q6K = tuple(0.1 * k for k in range(-9, 10))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _as_rows(array: np.ndarray) -> np.ndarray:
    """The input as contiguous float32 with a last dimension that is a whole number of super-blocks."""
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar")
    if x.shape[-1] % QK_K != 0:
        raise ValueError(f"K-quants need a row length that is a multiple of {QK_K}; got {x.shape[-1]}")
    return x


def _f16_up(values: np.ndarray, what: str) -> np.ndarray:
    """Non-negative float32 -> the smallest float16 >= each value (never 0 for a positive value).

    Rounding the super-block factors *up* keeps every sub-block ratio within the integer range
    (no clipping of the largest scale), and a positive factor never underflows to zero; both keep
    the error bound stated in ``quantize_q4_k`` valid for any magnitude float16 can hold.
    """
    with np.errstate(over="ignore"):
        h = values.astype(np.float16)
    low = h.astype(np.float32) < values
    if low.any():
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.isfinite(h).all():
        raise ValueError(f"values too large for a K-quant: the super-block {what} overflows float16 "
                         f"(max {float(np.abs(values).max()):.3g})")
    return h


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row dot product of two (n, L) arrays."""
    return np.einsum("ij,ij->i", a, b)


def _check_finite(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize NaN or infinite values")


def _run_chunked(x: np.ndarray, block_bytes: int, quantize_blocks) -> np.ndarray:
    """Apply ``quantize_blocks`` ((n, 256) float32 -> (n, block_bytes) uint8) over all super-blocks."""
    x = _as_rows(x)
    blocks = x.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], block_bytes), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // QK_K)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start:start + step]
        _check_finite(chunk)
        out[start:start + step] = quantize_blocks(chunk)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * block_bytes)


# ----------------------------------------------------------------------------------------------
# per-sub-block fits (float)
# ----------------------------------------------------------------------------------------------

def fit_scale_offset(x: np.ndarray, nmax: int, grid: tuple[float, float, int]) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric fit of each row of ``x`` (n, L): ``x ~= scale*q - offset``, q in 0..nmax.

    Returns ``(scale, offset)``, both float32 arrays of shape (n,) and both >= 0 (the decoder
    subtracts the offset, so the grid always starts at or below zero, as in llama.cpp).

    The first candidate maps ``[min(x,0), max(x)]`` onto ``0..nmax`` (the plain min/max grid, whose
    worst error is half its step ``span/nmax``). Each further candidate uses ``nmax + first + step*k``
    levels over that range (some slightly coarser, some slightly finer so the extremes get clipped),
    assigns levels by rounding, then solves the weighted least-squares problem for (scale, offset)
    given those levels. The candidate with the smallest weighted squared error wins; that error is
    evaluated in closed form from the same sums, so each candidate costs one pass over the data.

    Guarantee used by the error bound: a refitted candidate is only accepted if its step is at most
    ``2*span/nmax`` and no value lies more than ``span/nmax`` outside its grid, so the chosen float fit
    never errs by more than ``span/nmax`` on any value (twice the plain grid's worst case).
    """
    first, step, nstep = grid
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    xmin = x.min(axis=1)
    xmax = x.max(axis=1)
    lo = np.minimum(xmin, 0.0)
    span = xmax - lo
    with np.errstate(divide="ignore"):
        inv_span = np.where(span > 0, np.float32(1.0) / span, np.float32(0.0)).astype(np.float32)

    rms = np.sqrt(_rowdot(x, x) / np.float32(x.shape[1]))
    w = np.abs(x)
    w += rms[:, None]
    xs = x - lo[:, None]                      # >= 0, so rounding never needs a lower clip
    wx = w * x
    ones = np.ones(x.shape[1], dtype=np.float32)    # row sums as a matrix-vector product (faster)

    # One pass over the data per candidate: the weighted sums of l, l^2 and l*x (rows of sums).
    # Candidate 0 is the plain grid (nmax levels); candidates 1.. are refitted.
    levels = [float(nmax)] + [nmax + first + step * k for k in range(nstep + 1)]
    sums = np.empty((3, len(levels), n), dtype=np.float32)
    lv = np.empty_like(x)
    wl = np.empty_like(x)
    for k, count in enumerate(levels):
        np.multiply(xs, (np.float32(count) * inv_span)[:, None], out=lv)
        np.rint(lv, out=lv)
        if count > nmax + 0.25:               # only the finer grids can round past the top level
            np.minimum(lv, np.float32(nmax), out=lv)
        np.multiply(w, lv, out=wl)
        np.matmul(wl, ones, out=sums[0, k])
        np.einsum("ij,ij->i", wl, lv, out=sums[1, k])
        np.einsum("ij,ij->i", wl, x, out=sums[2, k])

    # Everything below works on (candidates, sub-blocks) arrays of sums, in float64.
    sl, sl2, sxl = sums.astype(np.float64)
    sw = (w @ ones).astype(np.float64)
    swx = (wx @ ones).astype(np.float64)
    swx2 = _rowdot(wx, x).astype(np.float64)
    limit = span.astype(np.float64) / nmax                # one step of the plain grid
    with np.errstate(divide="ignore", invalid="ignore"):
        det = sw * sl2 - sl * sl
        s = (sw * sxl - swx * sl) / det
        m = (sl2 * swx - sl * sxl) / det
        # the grid must start at or below zero: refit the scale alone where it would not
        pos = m > 0
        m[pos] = 0.0
        s = np.where(pos, sxl / sl2, s)
        s[0], m[0] = limit, lo                            # candidate 0 keeps the plain grid
        # sum w*(s*l + m - x)^2, expanded; m is the (non-positive) start of the grid
        err = s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sw - 2 * m * swx + swx2
        clip = np.maximum(np.maximum(m - xmin, xmax - (m + nmax * s)), 0.0)
        ok = (det > 0) & (s > 0) & (s <= 2 * limit) & (clip <= limit)
    ok[0] = True
    err[~ok] = np.inf
    best = err.argmin(axis=0)[None, :]
    best_s = np.take_along_axis(s, best, axis=0)[0]
    best_m = np.take_along_axis(m, best, axis=0)[0]
    return best_s.astype(np.float32), (-best_m).astype(np.float32)


def fit_symmetric_scale(x: np.ndarray, nmax: int = 32) -> np.ndarray:
    """Symmetric fit of each row of ``x`` (n, L): ``x ~= scale*l``, l in -nmax..nmax-1.

    Returns the signed scale (n,) float32. The plain mapping sends the value of largest magnitude
    ``v`` to ``-nmax`` (the side of the integer range with the extra level): scale ``-v/nmax``, worst
    error ``max|x|/(2*nmax)``. Candidates ``-(nmax + delta)/v`` for deltas -0.9..0.9 assign levels,
    then the scale is refitted by least squares with weights ``x**2``; the candidate with the smallest
    weighted squared error wins. As for the asymmetric fit, a refitted candidate is only accepted if
    its step is at most ``2*max|x|/nmax`` and no value lies more than ``max|x|/nmax`` outside its grid.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    imax = np.abs(x).argmax(axis=1)
    vmax = np.take_along_axis(x, imax[:, None], axis=1)[:, 0]
    with np.errstate(divide="ignore"):
        inv = np.where(vmax != 0, np.float32(1.0) / vmax, np.float32(0.0)).astype(np.float32)
    w = x * x
    wx = w * x

    # candidate 0: the plain max-abs grid (scale -v/nmax); candidates 1..: refitted
    counts = [float(nmax)] + [nmax + delta for delta in _GRID_Q6K]
    sums = np.empty((2, len(counts), n), dtype=np.float32)
    lv = np.empty_like(x)
    wl = np.empty_like(x)
    for k, count in enumerate(counts):
        np.multiply(x, (np.float32(-count) * inv)[:, None], out=lv)
        np.rint(lv, out=lv)
        np.clip(lv, -nmax, nmax - 1, out=lv)
        np.einsum("ij,ij->i", wx, lv, out=sums[0, k])
        np.multiply(w, lv, out=wl)
        np.einsum("ij,ij->i", wl, lv, out=sums[1, k])

    sxl, sl2 = sums.astype(np.float64)
    amax = np.abs(vmax).astype(np.float64)
    limit = amax / nmax
    xmin = x.min(axis=1).astype(np.float64)
    xmax = x.max(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = sxl / sl2
        s[0] = -vmax.astype(np.float64) / nmax
        # "gain" = sum(w*x^2) - weighted squared error, to be maximised
        gain = 2 * s * sxl - s * s * sl2
        top = np.maximum(-nmax * s, (nmax - 1) * s)
        bottom = np.minimum(-nmax * s, (nmax - 1) * s)
        clip = np.maximum(np.maximum(bottom - xmin, xmax - top), 0.0)
        ok = (sl2 > 0) & (np.abs(s) <= 2 * limit) & (clip <= limit)
    ok[0] = True
    gain[~ok] = -np.inf
    best = gain.argmax(axis=0)[None, :]
    return np.take_along_axis(s, best, axis=0)[0].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------

def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack eight 6-bit scales and eight 6-bit mins (n, 8) into the 12-byte Q4_K/Q5_K field.

    Bytes 0-3 hold scales 0-3 in their low six bits and the top two bits of scales 4-7 in bits 6-7;
    bytes 4-7 do the same for the mins; bytes 8-11 hold the low four bits of scale 4+i (low nibble)
    and of min 4+i (high nibble).
    """
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _pack_nibbles_32(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..15 -> (n, 128): byte ``32*g + i`` = value ``64*g + i`` (low nibble)
    and value ``64*g + 32 + i`` (high nibble), i.e. sub-blocks 2g and 2g+1 share 32 bytes."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(q.shape[0], 128)


def _pack_q5_high(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..31 -> the 32-byte ``qh`` field: bit ``j`` of byte ``i`` is the fifth bit of
    value ``32*j + i`` (the i-th value of sub-block j)."""
    hi = (q >> 4).reshape(q.shape[0], 8, 32).astype(np.uint8)
    shifts = np.arange(8, dtype=np.uint8)[None, :, None]
    return np.bitwise_or.reduce(hi << shifts, axis=1)


def _pack_q6(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) values 0..63 -> (ql (n,128), qh (n,64)).

    Each half of the super-block (128 values) owns 64 bytes of ``ql`` and 32 bytes of ``qh``.
    In half h: ``ql`` byte j holds value ``128h + j`` in its low nibble and value ``128h + 64 + j``
    in its high nibble; ``qh`` byte i holds the top two bits of values ``128h + 32k + i`` for
    k = 0..3 in bits ``2k, 2k+1``.
    """
    n = q.shape[0]
    lo = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32)
    qh = hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)
    return ql, qh.reshape(n, 64)


# ----------------------------------------------------------------------------------------------
# Q4_K / Q5_K
# ----------------------------------------------------------------------------------------------

def _super_factor(values: np.ndarray, top: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block magnitudes (n, k) -> (float16 super-block factor (n,), the same as float32 (n, 1)).

    The factor is ``max/top`` rounded *up* to float16, so every value divided by it stays within
    ``top`` (no integer scale is ever clipped).
    """
    d16 = _f16_up(values.max(axis=1) / np.float32(top), what)
    return d16, d16.astype(np.float32)[:, None]


def _ratio(values: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """values / factor, 0 where the factor is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(factor != 0, values / factor, np.float32(0.0)).astype(np.float32)


def _requantize_asym(x: np.ndarray, a: np.ndarray, b: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels for x (n, 8, 32) with step a and offset b (n, 8), and the squared error per sub-block."""
    with np.errstate(divide="ignore"):
        inv_a = np.where(a > 0, np.float32(1.0) / a, np.float32(0.0)).astype(np.float32)
    q = x + b[:, :, None]
    q *= inv_a[:, :, None]
    np.rint(q, out=q)
    np.clip(q, 0, nmax, out=q)
    r = q * a[:, :, None]
    r -= b[:, :, None]
    r -= x
    return q, np.einsum("ijk,ijk->ij", r, r)


def _quantize_asym(blocks: np.ndarray, nmax: int, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared Q4_K/Q5_K core: (n, 256) -> (d16, dmin16, ls, lm, q) with q (n, 256) in 0..nmax.

    Each sub-block's fitted step and offset are rounded down and up to the 6-bit multiples of
    ``d``/``dmin`` (four combinations); the values are requantized with each and the combination with
    the smallest squared error is kept. When the step rounds down to zero the sub-block decodes to a
    single value, so for that case the offsets tried are the ones around the negated midrange (the
    single value with the smallest worst-case error).
    """
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32)
    scale, offset = fit_scale_offset(blocks.reshape(n * 8, 32), nmax, grid)
    scale, offset = scale.reshape(n, 8), offset.reshape(n, 8)
    d16, d = _super_factor(scale, 63, "scale d")
    dmin16, dmin = _super_factor(offset, 63, "min scale dmin")
    rs = np.floor(_ratio(scale, d))
    ro = _ratio(offset, dmin)
    mid = _ratio(-(x.max(axis=2) + x.min(axis=2)) * np.float32(0.5), dmin)

    best = None
    for ls in (rs, rs + 1):
        ls = np.clip(ls, 0, 63)
        base = np.floor(np.where(ls == 0, mid, ro))
        for lm in (base, base + 1):
            lm = np.clip(lm, 0, 63)
            q, sse = _requantize_asym(x, d * ls, dmin * lm, nmax)
            if best is None:
                best = [ls, lm, q, sse]
                continue
            better = sse < best[3]
            best[0] = np.where(better, ls, best[0])
            best[1] = np.where(better, lm, best[1])
            best[2] = np.where(better[:, :, None], q, best[2])
            best[3] = np.where(better, sse, best[3])
    ls, lm, q, _ = best
    return d16, dmin16, ls.astype(np.uint8), lm.astype(np.uint8), q.astype(np.uint8).reshape(n, QK_K)


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d16, dmin16, ls, lm, q = _quantize_asym(blocks, 15, _GRID_Q4K)
    n = blocks.shape[0]
    out = np.empty((n, BLOCK_BYTES["Q4_K"]), dtype=np.uint8)
    out[:, 0:2] = d16.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin16.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scales_mins(ls, lm)
    out[:, 16:144] = _pack_nibbles_32(q)
    return out


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d16, dmin16, ls, lm, q = _quantize_asym(blocks, 31, _GRID_Q5K)
    n = blocks.shape[0]
    out = np.empty((n, BLOCK_BYTES["Q5_K"]), dtype=np.uint8)
    out[:, 0:2] = d16.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin16.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scales_mins(ls, lm)
    out[:, 16:48] = _pack_q5_high(q)
    out[:, 48:176] = _pack_nibbles_32(q & 0x0F)
    return out


# ----------------------------------------------------------------------------------------------
# Q6_K
# ----------------------------------------------------------------------------------------------

def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) -> (n, 210) Q6_K blocks.

    The super-block factor is ``-s_max/128`` (rounded away from zero to float16), where ``s_max`` is
    the sub-block scale of largest magnitude, so that scale is stored as -128 (int8's extra negative
    level) and all the others fall in -128..128; +128 is stored as 127. Each sub-block scale is
    rounded down and up to a multiple of the factor, the values are requantized with both and the
    one with the smaller squared error is kept.
    """
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scale = fit_symmetric_scale(blocks.reshape(n * 16, 16), 32).reshape(n, 16)
    imax = np.abs(scale).argmax(axis=1)
    smax = np.take_along_axis(scale, imax[:, None], axis=1)[:, 0]
    d16 = _f16_up(np.abs(smax) / np.float32(128.0), "scale d")
    d16 = np.where(smax > 0, -d16, d16)
    d = d16.astype(np.float32)[:, None]
    base = np.floor(_ratio(scale, d))

    best = None
    for sc in (base, base + 1):
        sc = np.clip(sc, -128, 127)
        a = d * sc                                                       # (n, 16) signed step
        with np.errstate(divide="ignore"):
            inv_a = np.where(a != 0, np.float32(1.0) / a, np.float32(0.0)).astype(np.float32)
        q = x * inv_a[:, :, None]
        np.rint(q, out=q)
        np.clip(q, -32, 31, out=q)
        r = q * a[:, :, None]
        r -= x
        sse = np.einsum("ijk,ijk->ij", r, r)
        if best is None:
            best = [sc, q, sse]
            continue
        better = sse < best[2]
        best[0] = np.where(better, sc, best[0])
        best[1] = np.where(better[:, :, None], q, best[1])
        best[2] = np.where(better, sse, best[2])
    sc, q, _ = best
    q = (q + 32).astype(np.uint8).reshape(n, QK_K)
    ql, qh = _pack_q6(q)
    out = np.empty((n, BLOCK_BYTES["Q6_K"]), dtype=np.uint8)
    out[:, 0:128] = ql
    out[:, 128:192] = qh
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d16.reshape(n, 1).view(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """float array [..., cols] (cols % 256 == 0) -> uint8 Q4_K bytes [..., cols/256*144].

    Error bound, for every value x of sub-block j (32 values) of a super-block with stored factors
    ``d``, ``dmin`` and 6-bit ``sc[j]``, ``m[j]``, where ``a = d*sc[j]`` (the step), ``b = dmin*m[j]``
    and ``I = [-b, -b + 15a]`` (the decodable range):

    * exact, from nearest rounding and clipping: ``|x - x_hat| <= a/2 + dist(x, I)``;
    * quality: ``|x - x_hat| <= span/15 + 15*d + dmin`` with ``span = max(x_j) - min(min(x_j), 0)``.
      The float fit errs by at most ``span/15`` (one step of the plain min/max grid; the search only
      accepts candidates within that). The step and the offset are then rounded down or up to
      multiples of ``d`` and ``dmin`` (whichever pair fits better), which moves the step by less than
      ``d`` -- the top of the range by less than ``15*d`` -- and the offset by less than ``dmin``.
      (A sub-block whose step rounds to zero decodes to one value, chosen near its midrange; the
      same bound holds.) Factors are rounded *up* to float16, so no 6-bit scale is ever clipped and
      the bound holds down to magnitudes float16 cannot resolve (there the factors are float16's
      smallest step, ~6e-8).
    """
    return _run_chunked(array, BLOCK_BYTES["Q4_K"], _q4_k_blocks)


def quantize_q5_k(array: np.ndarray) -> np.ndarray:
    """float array [..., cols] (cols % 256 == 0) -> uint8 Q5_K bytes [..., cols/256*176].

    Same bounds as :func:`quantize_q4_k` with 31 levels instead of 15:
    ``|x - x_hat| <= a/2 + dist(x, [-b, -b + 31a])`` and ``|x - x_hat| <= span/31 + 31*d + dmin``.
    """
    return _run_chunked(array, BLOCK_BYTES["Q5_K"], _q5_k_blocks)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """float array [..., cols] (cols % 256 == 0) -> uint8 Q6_K bytes [..., cols/256*210].

    Error bound, for every value x of sub-block j (16 values) with ``a = d*sc[j]`` (signed step) and
    decodable range ``I = a*[-32, 31]``:

    * exact: ``|x - x_hat| <= |a|/2 + dist(x, I)``;
    * quality: ``|x - x_hat| <= max|x_j|/32 + 32*|d|``. The float fit errs by at most
      ``max|x_j|/32`` (one step of the plain max-abs grid); the int8 scale is the fitted one rounded
      down or up (whichever fits better; +128 is stored as +127), so within ``|d|`` of it, which
      moves the ends of the range by at most ``32*|d|``.
    """
    return _run_chunked(array, BLOCK_BYTES["Q6_K"], _q6_k_blocks)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_kquant(array: np.ndarray, type_name: str) -> np.ndarray:
    """Dispatch on the GGML type name ("Q4_K", "Q5_K" or "Q6_K")."""
    try:
        fn = QUANTIZERS[type_name]
    except KeyError:
        raise ValueError(f"not a K-quant this module writes: {type_name} (have {sorted(QUANTIZERS)})") from None
    return fn(array)
