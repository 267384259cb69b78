"""K-quant quantizers and the GGUF type plan, checked against gguf's own (independent) dequantizer.

Error bounds asserted (derived in the docstrings of ``fasttune.export.kquants.quantize_q*_k``), per
value x of sub-block j, with the step ``a``, offset ``b`` and super-block factors ``d``/``dmin`` read
back from the stored bytes:

* exact (rounding + clipping; any packing mistake breaks it):
  Q4_K/Q5_K ``|x - x_hat| <= a/2 + dist(x, [-b, -b + nmax*a])``,
  Q6_K ``|x - x_hat| <= |a|/2 + dist(x, a*[-32, 31])``;
* quality: Q4_K/Q5_K ``|x - x_hat| <= span_j/nmax + nmax*d + dmin`` with
  ``span_j = max(x_j) - min(min(x_j), 0)``; Q6_K ``|x - x_hat| <= max|x_j|/32 + 32*|d|``.

RMSE on standard-normal data, relative to its standard deviation (measured 0.071 / 0.035 / 0.0176;
gguf's Q4_0 / Q5_0 / Q8_0 give 0.086 / 0.043 / 0.0053): asserted Q4_K <= 0.073, Q5_K <= 0.037,
Q6_K <= 0.0185, each K-quant below the legacy type of the same size, and Q6_K < Q5_K < Q4_K.
The same limits (plus ~10%) hold for the bulk of rows that carry a 150-sigma outlier: the
outlier's super-block factor grows, but the other sub-blocks keep their own scales.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from fasttune.export import kquants
from fasttune.export.quantize import PRESETS, file_type, plan_types, quantize, use_more_bits

T = gguf.GGMLQuantizationType
KTYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
NMAX = {T.Q4_K: 15, T.Q5_K: 31}
RMSE_LIMIT = {T.Q4_K: 0.073, T.Q5_K: 0.037, T.Q6_K: 0.0185}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def _datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    out = {
        "normal": rng.standard_normal((16, 1024)),
        "student_t2": rng.standard_t(2, (16, 1024)),
        "cauchy": rng.standard_t(1, (8, 1024)),
        "weights_like": rng.standard_normal((16, 1024)) * 0.02,
        "uniform": rng.uniform(-1, 1, (8, 512)),
        "tiny": rng.standard_normal((4, 512)) * 1e-8,
        "huge": rng.standard_normal((4, 512)) * 1e4,
        "all_positive": np.abs(rng.standard_normal((4, 512))) + 3.0,
        "all_negative": -np.abs(rng.standard_normal((4, 512))) - 3.0,
    }
    mixed = rng.standard_normal((8, 1024)) * 0.02
    mixed[0, :256] = 0.0                      # an all-zero super-block
    mixed[1, :256] = 0.75                     # constant positive super-block
    mixed[2, 256:512] = -1.25                 # constant negative super-block
    mixed[3, 32:64] = 0.0                     # one all-zero sub-block inside a normal super-block
    mixed[4, 16:32] = 0.5                     # a constant Q6_K sub-block
    mixed[5, ::97] = 5.0                      # sparse large outliers
    mixed[6, 300] = -40.0                     # a single huge outlier: the other sub-blocks get tiny scales
    mixed[7] = 0.0                            # an all-zero row
    out["mixed"] = mixed
    return {k: v.astype(np.float32) for k, v in out.items()}


DATASETS = _datasets()


def _gaussian() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((64, 4096)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# reading the stored parameters back (layout as gguf's dequantizer reads it)
# ----------------------------------------------------------------------------------------------

def _asym_params(raw: np.ndarray, qtype: T):
    """(d, dmin, step a (n,8), offset b (n,8)) of Q4_K/Q5_K blocks."""
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    return d, dmin, d * sc, dmin * m


def _q6_params(raw: np.ndarray):
    """(d (n,1), signed step a (n,16)) of Q6_K blocks."""
    blocks = raw.reshape(-1, 210)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float64)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float64)
    return d, d * sc


def _bounds(x: np.ndarray, raw: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """(exact bound, quality bound), both shaped like x, from the stored bytes."""
    x = x.astype(np.float64)
    if qtype == T.Q6_K:
        d, a = _q6_params(raw)
        xs = x.reshape(-1, 16, 16)
        a3 = a[:, :, None]
        lo, hi = np.minimum(-32 * a3, 31 * a3), np.maximum(-32 * a3, 31 * a3)
        exact = np.abs(a3) / 2 + np.maximum(0, np.maximum(lo - xs, xs - hi))
        amax = np.abs(xs).max(axis=2, keepdims=True)
        quality = amax / 32 + 32 * np.abs(d)[:, :, None] + 0 * xs
    else:
        nmax = NMAX[qtype]
        d, dmin, a, b = _asym_params(raw, qtype)
        xs = x.reshape(-1, 8, 32)
        a3, b3 = a[:, :, None], b[:, :, None]
        exact = a3 / 2 + np.maximum(0, np.maximum(-b3 - xs, xs - (-b3 + nmax * a3)))
        span = xs.max(axis=2, keepdims=True) - np.minimum(xs.min(axis=2, keepdims=True), 0)
        quality = span / nmax + (nmax * d + dmin)[:, :, None] + 0 * xs
    return exact.reshape(x.shape), quality.reshape(x.shape)


def _violations(x: np.ndarray, raw: np.ndarray, qtype: T) -> tuple[int, int]:
    """How many values break the exact bound and the quality bound (tiny float32 slack allowed)."""
    x_hat = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    err = np.abs(x.astype(np.float64) - x_hat)
    exact, quality = _bounds(x, raw, qtype)
    slack = 1e-5 * np.abs(x) + 1e-6 * exact + 1e-30
    return int((err > exact + slack).sum()), int((err > quality + slack).sum())


def _rel_rmse(x: np.ndarray, qtype: T) -> float:
    x_hat = gguf.quants.dequantize(quantize(x, qtype), qtype)
    return float(np.sqrt(np.mean((x - x_hat) ** 2)) / x.std())


# ----------------------------------------------------------------------------------------------
# K-quant format and error bounds
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("data", sorted(DATASETS))
def test_kquant_layout_and_error_bounds(qtype, data):
    x = DATASETS[data]
    raw = quantize(x, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert block == kquants.QK_K and type_size == kquants.BLOCK_BYTES[qtype.name]
    assert raw.dtype == np.uint8
    assert raw.shape == (x.shape[0], x.shape[1] // 256 * type_size)
    x_hat = gguf.quants.dequantize(raw, qtype)
    assert x_hat.shape == x.shape and np.isfinite(x_hat).all()
    exact_bad, quality_bad = _violations(x, raw, qtype)
    assert exact_bad == 0, f"{exact_bad} values outside the exact rounding bound"
    assert quality_bad == 0, f"{quality_bad} values outside the stated quality bound"


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_zero_and_constant_blocks_decode_closely(qtype):
    x = DATASETS["mixed"]
    x_hat = gguf.quants.dequantize(quantize(x, qtype), qtype)
    assert np.array_equal(x_hat[7], np.zeros_like(x_hat[7]))          # all-zero row stays exactly zero
    assert np.array_equal(x_hat[0, :256], np.zeros(256, np.float32))  # all-zero super-block too
    # constants come back to float16 precision of the super-block factor times a few
    assert np.abs(x_hat[1, :256] - 0.75).max() <= 2e-3
    assert np.abs(x_hat[2, 256:512] + 1.25).max() <= 2e-3


def test_tiny_magnitudes_never_blow_up():
    """Values below float16's resolution decode near zero, never to something larger than the input."""
    x = DATASETS["tiny"]
    for qtype in KTYPES:
        x_hat = gguf.quants.dequantize(quantize(x, qtype), qtype)
        assert np.abs(x - x_hat).max() <= np.abs(x).max() * 1.0001


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_gaussian_rmse_matches_stated_quality(qtype):
    assert _rel_rmse(_gaussian(), qtype) <= RMSE_LIMIT[qtype]


def test_more_bits_less_error_and_beats_legacy_types():
    x = _gaussian()
    err = {t: _rel_rmse(x, t) for t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q5_0, T.Q8_0)}
    assert err[T.Q6_K] < err[T.Q5_K] < err[T.Q4_K]
    assert err[T.Q4_K] <= err[T.Q4_0]          # 4.5 bits vs 4.5 bits
    assert err[T.Q5_K] <= err[T.Q5_0]          # 5.5 bits vs 5.5 bits
    assert err[T.Q8_0] < err[T.Q6_K] < err[T.Q5_0]


def test_heavy_tailed_rows_with_outliers_keep_the_bulk():
    """A 150-sigma outlier per row must not wreck the other sub-blocks of its super-block."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 2048)) * 0.02).astype(np.float32)
    x[:, 5] = 3.0
    bulk = np.ones_like(x, dtype=bool)
    bulk[:, :32] = False                      # the outlier's own sub-block
    for qtype in KTYPES:
        x_hat = gguf.quants.dequantize(quantize(x, qtype), qtype)
        rel = np.sqrt(np.mean((x - x_hat)[bulk] ** 2)) / x[bulk].std()
        assert rel <= 1.1 * RMSE_LIMIT[qtype], (qtype.name, rel)


# ----------------------------------------------------------------------------------------------
# negative controls: a wrong layout must fail the checks above
# ----------------------------------------------------------------------------------------------

def _swap_nibbles(b: np.ndarray) -> np.ndarray:
    return ((b >> 4) | (b << 4)).astype(np.uint8)


def _reverse_bits(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b[..., None], axis=-1, bitorder="little")[..., ::-1].reshape(*b.shape, 8).dot(
        1 << np.arange(8)).astype(np.uint8)


def _q4k_swap_nibbles(blk):
    blk[:, 16:144] = _swap_nibbles(blk[:, 16:144])


def _q4k_scale_bytes(blk):
    blk[:, 4:16] = blk[:, [8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]]


def _q5k_high_bits(blk):
    blk[:, 16:48] = _reverse_bits(blk[:, 16:48])


def _q6k_ql_quarters(blk):
    blk[:, 0:128] = np.concatenate([blk[:, 32:64], blk[:, 0:32], blk[:, 96:128], blk[:, 64:96]], axis=1)


def _q6k_qh_pairs(blk):
    blk[:, 128:192] = _swap_nibbles(blk[:, 128:192])


# what is wrong -> (type, how to break a copy of the (n, type_size) blocks in place)
CORRUPTIONS = {
    "Q4_K nibble order": (T.Q4_K, _q4k_swap_nibbles),
    "Q4_K scale/min packing": (T.Q4_K, _q4k_scale_bytes),
    "Q5_K high-bit order": (T.Q5_K, _q5k_high_bits),
    "Q6_K ql quarters": (T.Q6_K, _q6k_ql_quarters),
    "Q6_K qh pairs": (T.Q6_K, _q6k_qh_pairs),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_negative_control_layout_bug_is_caught(case):
    qtype, corrupt = CORRUPTIONS[case]
    x = _gaussian()[:16]
    raw = quantize(x, qtype)
    bad = raw.copy().reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    corrupt(bad)
    bad = bad.reshape(raw.shape)
    assert not np.array_equal(bad, raw)
    good_rmse = np.sqrt(np.mean((x - gguf.quants.dequantize(raw, qtype)) ** 2))
    bad_rmse = np.sqrt(np.mean((x - gguf.quants.dequantize(bad, qtype)) ** 2))
    assert bad_rmse > 5 * good_rmse, (case, good_rmse, bad_rmse)
    exact_bad, _ = _violations(x, bad, qtype)
    assert exact_bad > x.size // 20, f"the bound check missed a corrupted layout ({case})"


# ----------------------------------------------------------------------------------------------
# input checking
# ----------------------------------------------------------------------------------------------

def test_kquant_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 64), np.float32), T.Q4_K)
    bad = np.zeros((1, 256), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize(bad, T.Q5_K)
    with pytest.raises(ValueError, match="overflows float16"):
        quantize(np.full((1, 256), 1e9, np.float32), T.Q6_K)


def test_quantize_matches_gguf_for_the_types_it_delegates():
    x = _gaussian()[:4, :512]
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1):
        assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, qtype)), qtype.name


# ----------------------------------------------------------------------------------------------
# plan_types
# ----------------------------------------------------------------------------------------------

def _llama_tensors(n_layers: int, hidden: int, kv: int, ff: int, vocab: int, tied: bool = False):
    tensors = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (kv, hidden)),
            (f"blk.{i}.attn_v.weight", (kv, hidden)),
            (f"blk.{i}.attn_q.bias", (hidden,)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", (hidden,)),
            (f"blk.{i}.ffn_gate.weight", (ff, hidden)),
            (f"blk.{i}.ffn_up.weight", (ff, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, ff)),
        ]
    tensors.append(("output_norm.weight", (hidden,)))
    if not tied:
        tensors.append(("output.weight", (vocab, hidden)))
    return tensors


# 32 layers: first eighth 0-3, last eighth 28-31, and (i - 4) % 3 == 2 in between
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def test_use_more_bits_rule():
    assert {i for i in range(32) if use_more_bits(i, 32)} == MORE_BITS_32
    assert {i for i in range(8) if use_more_bits(i, 8)} == {0, 3, 6, 7}
    assert {i for i in range(4) if use_more_bits(i, 4)} == {2, 3}     # n/8 == 0: only the modulo and the tail


@pytest.mark.parametrize("preset, base", [("q4_k_m", T.Q4_K), ("q5_k_m", T.Q5_K)])
def test_k_m_presets_on_a_32_layer_model(preset, base):
    tensors = _llama_tensors(32, 4096, 1024, 11008, 32000)
    plan = plan_types(preset, tensors, 32)
    assert set(plan) == {name for name, _ in tensors}
    for i in range(32):
        want = T.Q6_K if i in MORE_BITS_32 else base
        assert plan[f"blk.{i}.attn_v.weight"] == (want, None)
        assert plan[f"blk.{i}.ffn_down.weight"] == (want, None)
        for part in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert plan[f"blk.{i}.{part}.weight"] == (base, None)
        for one_d in ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias"):
            assert plan[f"blk.{i}.{one_d}"] == (T.F32, None)
    assert plan["output.weight"] == (T.Q6_K, None)
    assert plan["token_embd.weight"] == (base, None)
    assert plan["output_norm.weight"] == (T.F32, None)


def test_tied_embeddings_get_the_output_type():
    plan = plan_types("q4_k_m", _llama_tensors(2, 512, 512, 1536, 1000, tied=True), 2)
    assert plan["token_embd.weight"] == (T.Q6_K, None)


def test_fused_qkv_follows_attn_v_and_fused_gate_up_stays_default():
    tensors = []
    for i in range(16):
        tensors += [(f"blk.{i}.attn_qkv.weight", (3 * 3072, 3072)), (f"blk.{i}.ffn_up.weight", (2 * 8192, 3072)),
                    (f"blk.{i}.ffn_down.weight", (3072, 8192))]
    plan = plan_types("q4_k_m", tensors, 16)
    more = {i for i in range(16) if use_more_bits(i, 16)}
    assert more == {0, 1, 4, 7, 10, 13, 14, 15}
    for i in range(16):
        assert plan[f"blk.{i}.attn_qkv.weight"][0] == (T.Q6_K if i in more else T.Q4_K)
        assert plan[f"blk.{i}.ffn_up.weight"][0] == T.Q4_K


def test_hidden_64_tensors_fall_back_with_notes():
    tensors = _llama_tensors(8, 64, 64, 256, 1000)          # 8 layers: more bits in 0, 3, 6, 7
    plan = plan_types("q4_k_m", tensors, 8)
    qtype, note = plan["blk.0.attn_k.weight"]
    assert qtype == T.Q5_0
    assert note == "blk.0.attn_k.weight: row length 64 is not a multiple of 256; Q4_K -> Q5_0 (as llama.cpp does)"
    # a more-bits attn_v wanted Q6_K, whose fallback is Q8_0; the others wanted Q4_K
    assert plan["blk.0.attn_v.weight"] == (
        T.Q8_0, "blk.0.attn_v.weight: row length 64 is not a multiple of 256; Q6_K -> Q8_0 (as llama.cpp does)")
    assert plan["blk.1.attn_v.weight"][0] == T.Q5_0
    # ffn_down rows are 256 long: no fallback
    assert plan["blk.0.ffn_down.weight"] == (T.Q6_K, None)
    assert plan["blk.1.ffn_down.weight"] == (T.Q4_K, None)
    assert plan["output.weight"][0] == T.Q8_0 and "output.weight: row length 64" in plan["output.weight"][1]
    plan5 = plan_types("q5_k_m", tensors, 8)
    assert plan5["blk.0.attn_q.weight"][0] == T.Q5_1 and "Q5_K -> Q5_1" in plan5["blk.0.attn_q.weight"][1]
    # a row that not even the fallback's 32-value block divides: F16
    odd = plan_types("q4_k_m", [("blk.0.attn_q.weight", (48, 48))], 1)["blk.0.attn_q.weight"]
    assert odd[0] == T.F16 and "F16" in odd[1]
    q8 = plan_types("q8_0", [("blk.0.attn_q.weight", (48, 48))], 1)["blk.0.attn_q.weight"]
    assert q8[0] == T.F16 and "Q8_0 -> F16" in q8[1]
    for name, (qtype, note) in plan.items():
        if "norm" in name or name.endswith(".bias"):
            assert (qtype, note) == (T.F32, None)


def test_q8_0_and_other_presets():
    tensors = _llama_tensors(4, 512, 128, 1536, 1000)
    plan = plan_types("q8_0", tensors, 4)
    for name, shape in tensors:
        assert plan[name] == ((T.Q8_0 if len(shape) == 2 else T.F32), None)
    plan = plan_types("q4_0", tensors, 4)
    assert plan["output.weight"] == (T.Q6_K, None) and plan["blk.0.attn_v.weight"] == (T.Q4_0, None)
    plan = plan_types("q6_k", tensors, 4)
    assert {plan[n][0] for n, s in tensors if len(s) == 2} == {T.Q6_K}
    for preset, t in (("f16", T.F16), ("bf16", T.BF16), ("f32", T.F32)):
        plan = plan_types(preset, tensors + [("blk.0.odd.weight", (7, 9))], 4)
        assert plan["blk.0.odd.weight"] == (t, None) and plan["blk.0.ffn_norm.weight"] == (T.F32, None)
    with pytest.raises(ValueError, match="unknown GGUF preset"):
        plan_types("q3_k_s", tensors, 4)


def test_file_types():
    assert file_type("q4_k_m") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert file_type("q5_k_m") == gguf.LlamaFileType.MOSTLY_Q5_K_M
    assert file_type("q6_k") == gguf.LlamaFileType.MOSTLY_Q6_K
    assert file_type("f32") == gguf.LlamaFileType.ALL_F32
    assert len({file_type(p) for p in PRESETS}) == len(PRESETS)


# ----------------------------------------------------------------------------------------------
# end to end through gguf's writer and reader
# ----------------------------------------------------------------------------------------------

def test_gguf_writer_accepts_every_type(tmp_path):
    x = _gaussian()[:8, :512]
    types = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(int(file_type("q4_k_m")))
    expected = {}
    for qtype in types:
        data = quantize(x, qtype)
        writer.add_tensor(f"t.{qtype.name}", data, raw_dtype=qtype)
        expected[f"t.{qtype.name}"] = (qtype, gguf.quants.dequantize(data, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    seen = set()
    for tensor in reader.tensors:
        qtype, want = expected[tensor.name]
        assert tensor.tensor_type == qtype
        assert [int(n) for n in tensor.shape] == [512, 8]       # GGUF order: row length first
        got = gguf.quants.dequantize(np.asarray(tensor.data), qtype).reshape(x.shape)
        assert np.array_equal(got, want.reshape(x.shape)), qtype.name
        assert np.abs(got - x).max() <= 0.5, qtype.name
        seen.add(tensor.name)
    assert seen == set(expected)
