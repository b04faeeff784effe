"""Flash attention (non-causal), forward and backward, in Triton: softmax(q k^T * scale) v.

Shapes: q, k, v (B, H, T, d), read through their strides (the views that
``qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)`` makes need no copy); the output is (B, H, T, d)
in q's dtype, a view of a (B, T, H, d)-contiguous buffer so the model's following
``transpose(1, 2).reshape(B, T, H * d)`` is free. The forward also returns the log-sum-exp (B, H, T)
fp32 that the backward (FA2 scheme: delta preprocess, one kernel over key blocks for dk/dv, one over
query blocks for dq; no atomics, so the backward is deterministic) needs.

Head dims that are not a power of two (DiT-XL's d = 72): ``tl.arange`` and ``tl.dot`` need
power-of-two tile widths, and public Triton kernels pad 72 to 128, wasting 44% of the matmul work.
Here the head dim is split into two power-of-two column tiles, D0 = the largest power of two <= d and
D1 = the rest rounded up to a power of two (at least 16, the smallest ``tl.dot`` depth): 72 = 64 + 16
(pad to 80, 10% waste), 40 = 32 + 16, 96 = 64 + 32; powers of two (32, 64, 128) use one tile. Every
product over d is two ``tl.dot`` calls summed into one fp32 accumulator, and every product that
produces d columns keeps two accumulators. Only the second tile needs a column mask.

Numerics: fp32 accumulation, exp2 with log2(e) folded into the scale, key tails masked with -inf
before the row max (every row sees key 0, so the row max is finite and padding rows never make NaN).
"""
import os

import torch

from dit_fast_kernels.runtime import triton_status

try:  # the package must import without triton; the launchers are only reached when it is present
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # beyond this the fp32 accumulators (BLOCK x d) no longer fit in registers
_INTERPRETER_BLOCK = 16  # one small config keeps the CPU interpreter fast
# triton.jit picks interpreter or compiler when the kernels below are decorated, i.e. at this import
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- reference
def attention_ref(q, k, v, scale=None, return_lse=False):
    """Readable fp32 attention: q, k, v (B, H, T, d) -> out (B, H, T, d) fp32 [, lse (B, H, T) fp32]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, T)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T)
    out = torch.softmax(scores, dim=-1) @ v.float()  # (B, H, T, d)
    return (out, lse) if return_lse else out


def attention_bwd_ref(dout, q, k, v, out, lse, scale):
    """Readable fp32 backward from the saved lse (same math as the kernels) -> dq, dk, dv fp32."""
    q, k, v, dout, out = (t.float() for t in (q, k, v, dout, out))
    p = torch.exp((q @ k.transpose(-1, -2)) * scale - lse.unsqueeze(-1))  # (B, H, T, T) softmax
    delta = (dout * out).sum(-1, keepdim=True)  # (B, H, T, 1) = rowsum(dP * P)
    dv = p.transpose(-1, -2) @ dout
    ds = p * (dout @ v.transpose(-1, -2) - delta)  # (B, H, T, T) gradient of the scaled scores
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _load_tile(base, rows, cols, stride_row, T, HEAD_D: tl.constexpr,
                   MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr):
        # base: element (0, 0) of a (T, HEAD_D) matrix, row stride stride_row * ALIGN, column stride 1
        ptrs = base + rows[:, None] * (stride_row * ALIGN) + cols[None, :]
        if MASK_ROWS:
            if MASK_COLS:
                tile = tl.load(ptrs, mask=(rows[:, None] < T) & (cols[None, :] < HEAD_D), other=0.0)
            else:
                tile = tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
        else:
            if MASK_COLS:
                tile = tl.load(ptrs, mask=cols[None, :] < HEAD_D, other=0.0)
            else:
                tile = tl.load(ptrs)
        return tile

    @triton.jit
    def _store_tile(base, tile, rows, cols, stride_row, T, HEAD_D: tl.constexpr,
                    MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr):
        # base: element (0, 0) of a (T, HEAD_D) matrix, row stride stride_row * ALIGN, column stride 1
        ptrs = base + rows[:, None] * (stride_row * ALIGN) + cols[None, :]
        tile = tile.to(base.dtype.element_ty)
        if MASK_ROWS:
            if MASK_COLS:
                tl.store(ptrs, tile, mask=(rows[:, None] < T) & (cols[None, :] < HEAD_D))
            else:
                tl.store(ptrs, tile, mask=rows[:, None] < T)
        else:
            if MASK_COLS:
                tl.store(ptrs, tile, mask=cols[None, :] < HEAD_D)
            else:
                tl.store(ptrs, tile)

    @triton.jit
    def _load_rows(base, rows, T, other, MASK_ROWS: tl.constexpr):
        # base: a (T,) fp32 vector (lse or delta of one (b, h)), contiguous
        if MASK_ROWS:
            vec = tl.load(base + rows, mask=rows < T, other=other)
        else:
            vec = tl.load(base + rows)
        return vec

    @triton.jit
    def _fwd_kernel(
        Q, K, V,  # (B, H, T, d): strides (s_b, s_h, s_t, 1), e.g. views of a packed qkv buffer
        Out,  # (B, H, T, d): a view of a (B, T, H, d)-contiguous buffer
        Lse,  # (B, H, T) fp32 contiguous: natural-log log-sum-exp of the scaled scores
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
        H, T, qk_scale,  # qk_scale = softmax_scale * log2(e), so the softmax uses exp2
        HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
        MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_T: tl.constexpr, DOT_PREC: tl.constexpr,
        ALIGN: tl.constexpr,  # every stride argument is in units of ALIGN elements (see _align)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        num_m = tl.cdiv(T, BLOCK_M)
        pid_m = tl.program_id(0) % num_m  # consecutive programs share (b, h): K/V stay in L2
        bh = tl.program_id(0) // num_m
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + (b * stride_qb + h * stride_qh) * ALIGN
        k_base = K + (b * stride_kb + h * stride_kh) * ALIGN
        v_base = V + (b * stride_vb + h * stride_vh) * ALIGN
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, D0)
        cols1 = D0 + tl.arange(0, D1)

        q0 = _load_tile(q_base, rows, cols0, stride_qt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)  # (BM, D0)
        if HAS_D1:
            q1 = _load_tile(q_base, rows, cols1, stride_qt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)  # (BM, D1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
        for start_n in range(0, T, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            k0 = _load_tile(k_base, keys, cols0, stride_kt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
            s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BM, BN)
            if HAS_D1:
                k1 = _load_tile(k_base, keys, cols1, stride_kt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
                s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            s = s * qk_scale
            if MASK_T:
                s = tl.where(keys[None, :] < T, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
            l_i = l_i * alpha + tl.sum(p, 1)
            v0 = _load_tile(v_base, keys, cols0, stride_vt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
            acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PREC)
            if HAS_D1:
                v1 = _load_tile(v_base, keys, cols1, stride_vt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=DOT_PREC)
            m_i = m_new

        # l_i >= 1 for every row (its max term is exp2(0)), so no division by zero, even on padding
        o_base = Out + (b * stride_ob + h * stride_oh) * ALIGN
        _store_tile(o_base, acc0 / l_i[:, None], rows, cols0, stride_ot, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
        if HAS_D1:
            _store_tile(o_base, acc1 / l_i[:, None], rows, cols1, stride_ot, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 units -> natural log
        lse_ptrs = Lse + bh.to(tl.int64) * T + rows
        if MASK_T:
            tl.store(lse_ptrs, lse, mask=rows < T)
        else:
            tl.store(lse_ptrs, lse)

    @triton.jit
    def _bwd_preprocess_kernel(
        Out, DOut,  # (B, H, T, d): strides (s_b, s_h, s_t, 1)
        Delta,  # (B, H, T) fp32 contiguous: rowsum(dOut * Out)
        stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
        H, T,
        HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
        MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_T: tl.constexpr, BLOCK_M: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        num_m = tl.cdiv(T, BLOCK_M)
        pid_m = tl.program_id(0) % num_m
        bh = tl.program_id(0) // num_m
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        o_base = Out + (b * stride_ob + h * stride_oh) * ALIGN
        do_base = DOut + (b * stride_dob + h * stride_doh) * ALIGN
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, D0)
        cols1 = D0 + tl.arange(0, D1)
        o0 = _load_tile(o_base, rows, cols0, stride_ot, T, HEAD_D, MASK_T, MASK_D0, ALIGN).to(tl.float32)
        do0 = _load_tile(do_base, rows, cols0, stride_dot, T, HEAD_D, MASK_T, MASK_D0, ALIGN).to(tl.float32)
        delta = tl.sum(o0 * do0, 1)
        if HAS_D1:
            o1 = _load_tile(o_base, rows, cols1, stride_ot, T, HEAD_D, MASK_T, MASK_D1, ALIGN).to(tl.float32)
            do1 = _load_tile(do_base, rows, cols1, stride_dot, T, HEAD_D, MASK_T, MASK_D1, ALIGN).to(tl.float32)
            delta += tl.sum(o1 * do1, 1)
        if MASK_T:
            tl.store(Delta + bh.to(tl.int64) * T + rows, delta, mask=rows < T)
        else:
            tl.store(Delta + bh.to(tl.int64) * T + rows, delta)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DOut,  # (B, H, T, d): strides (s_b, s_h, s_t, 1)
        Lse, Delta,  # (B, H, T) fp32 contiguous: forward log-sum-exp (natural log), rowsum(dOut * Out)
        DK, DV,  # (B, H, T, d): views of (B, T, H, d)-contiguous buffers, written in full
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
        stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
        H, T, softmax_scale, qk_scale,
        HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
        MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_T: tl.constexpr, DOT_PREC: tl.constexpr,
        ALIGN: tl.constexpr,  # every stride argument is in units of ALIGN elements (see _align)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program owns BLOCK_N keys of one (b, h) and walks all query blocks: transposed tiles
        # (keys x queries) so dk and dv accumulate as plain row blocks.
        num_n = tl.cdiv(T, BLOCK_N)
        pid_n = tl.program_id(0) % num_n
        bh = tl.program_id(0) // num_n
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + (b * stride_qb + h * stride_qh) * ALIGN
        do_base = DOut + (b * stride_dob + h * stride_doh) * ALIGN
        lse_base = Lse + bh.to(tl.int64) * T
        delta_base = Delta + bh.to(tl.int64) * T
        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols0 = tl.arange(0, D0)
        cols1 = D0 + tl.arange(0, D1)
        k_base = K + (b * stride_kb + h * stride_kh) * ALIGN
        v_base = V + (b * stride_vb + h * stride_vh) * ALIGN
        k0 = _load_tile(k_base, keys, cols0, stride_kt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)  # (BN, D0)
        v0 = _load_tile(v_base, keys, cols0, stride_vt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
        if HAS_D1:
            k1 = _load_tile(k_base, keys, cols1, stride_kt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)  # (BN, D1)
            v1 = _load_tile(v_base, keys, cols1, stride_vt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
        dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
        for start_m in range(0, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q0 = _load_tile(q_base, rows, cols0, stride_qt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)  # (BM, D0)
            do0 = _load_tile(do_base, rows, cols0, stride_dot, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
            s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BN, BM) scores^T
            if HAS_D1:
                q1 = _load_tile(q_base, rows, cols1, stride_qt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
                do1 = _load_tile(do_base, rows, cols1, stride_dot, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
                s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            # padding query rows load lse = +inf, so their probabilities are exactly 0
            lse2 = _load_rows(lse_base, rows, T, float("inf"), MASK_T) * 1.4426950408889634
            p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])  # (BN, BM) softmax^T
            delta = _load_rows(delta_base, rows, T, 0.0, MASK_T)
            dv0 += tl.dot(p_t.to(do0.dtype), do0, input_precision=DOT_PREC)
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)  # (BN, BM)
            if HAS_D1:
                dv1 += tl.dot(p_t.to(do1.dtype), do1, input_precision=DOT_PREC)
                dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)  # (BN, BM) d(scaled scores)^T
            dk0 += tl.dot(ds_t, q0, input_precision=DOT_PREC)
            if HAS_D1:
                dk1 += tl.dot(ds_t, q1, input_precision=DOT_PREC)

        dk_base = DK + (b * stride_dkb + h * stride_dkh) * ALIGN
        dv_base = DV + (b * stride_dvb + h * stride_dvh) * ALIGN
        _store_tile(dk_base, dk0 * softmax_scale, keys, cols0, stride_dkt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
        _store_tile(dv_base, dv0, keys, cols0, stride_dvt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
        if HAS_D1:
            _store_tile(dk_base, dk1 * softmax_scale, keys, cols1, stride_dkt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
            _store_tile(dv_base, dv1, keys, cols1, stride_dvt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DOut,  # (B, H, T, d): strides (s_b, s_h, s_t, 1)
        Lse, Delta,  # (B, H, T) fp32 contiguous
        DQ,  # (B, H, T, d): view of a (B, T, H, d)-contiguous buffer, written in full
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
        stride_dqb, stride_dqh, stride_dqt,
        H, T, softmax_scale, qk_scale,
        HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
        MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_T: tl.constexpr, DOT_PREC: tl.constexpr,
        ALIGN: tl.constexpr,  # every stride argument is in units of ALIGN elements (see _align)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program owns BLOCK_M queries and walks all key blocks: dq without atomics.
        num_m = tl.cdiv(T, BLOCK_M)
        pid_m = tl.program_id(0) % num_m
        bh = tl.program_id(0) // num_m
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + (b * stride_qb + h * stride_qh) * ALIGN
        do_base = DOut + (b * stride_dob + h * stride_doh) * ALIGN
        k_base = K + (b * stride_kb + h * stride_kh) * ALIGN
        v_base = V + (b * stride_vb + h * stride_vh) * ALIGN
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, D0)
        cols1 = D0 + tl.arange(0, D1)
        q0 = _load_tile(q_base, rows, cols0, stride_qt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)  # (BM, D0)
        do0 = _load_tile(do_base, rows, cols0, stride_dot, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
        if HAS_D1:
            q1 = _load_tile(q_base, rows, cols1, stride_qt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)  # (BM, D1)
            do1 = _load_tile(do_base, rows, cols1, stride_dot, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
        lse2 = _load_rows(Lse + bh.to(tl.int64) * T, rows, T, float("inf"), MASK_T) * 1.4426950408889634
        delta = _load_rows(Delta + bh.to(tl.int64) * T, rows, T, 0.0, MASK_T)
        dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
        for start_n in range(0, T, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            k0 = _load_tile(k_base, keys, cols0, stride_kt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)  # (BN, D0)
            v0 = _load_tile(v_base, keys, cols0, stride_vt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
            s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BM, BN)
            dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
            if HAS_D1:
                k1 = _load_tile(k_base, keys, cols1, stride_kt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
                v1 = _load_tile(v_base, keys, cols1, stride_vt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)
                s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
                dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
            if MASK_T:  # padding keys load as zeros and would get weight exp(-lse) otherwise
                p = tl.where(keys[None, :] < T, p, 0.0)
            ds = (p * (dp - delta[:, None])).to(k0.dtype)  # (BM, BN) d(scaled scores)
            dq0 += tl.dot(ds, k0, input_precision=DOT_PREC)
            if HAS_D1:
                dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)

        dq_base = DQ + (b * stride_dqb + h * stride_dqh) * ALIGN
        _store_tile(dq_base, dq0 * softmax_scale, rows, cols0, stride_dqt, T, HEAD_D, MASK_T, MASK_D0, ALIGN)
        if HAS_D1:
            _store_tile(dq_base, dq1 * softmax_scale, rows, cols1, stride_dqt, T, HEAD_D, MASK_T, MASK_D1, ALIGN)

    def _mask_t(args):  # tails need masks only when T is not a multiple of both tile heights
        return args["T"] % args["BLOCK_M"] != 0 or args["T"] % args["BLOCK_N"] != 0

    def _configs(shapes):  # (BLOCK_M, BLOCK_N, num_warps, num_stages), H100-sized
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    _fwd_plain = triton.heuristics({"MASK_T": _mask_t})(_fwd_kernel)
    _dkdv_plain = triton.heuristics({"MASK_T": _mask_t})(_bwd_dkdv_kernel)
    _dq_plain = triton.heuristics({"MASK_T": _mask_t})(_bwd_dq_kernel)
    # autotuning only on CUDA (the interpreter uses one small config); keyed on T and d (+ dtypes).
    # Short lists keep the first call's compile time down; at d = 72, bf16, sm_90 every config below
    # compiles to wgmma with cp.async pipelining and no register spills (checked offline, ptxas -v).
    _fwd_tuned = triton.autotune(_configs([
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
    ]), key=["T", "HEAD_D"])(_fwd_plain)
    _dkdv_tuned = triton.autotune(_configs([
        (64, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3),
    ]), key=["T", "HEAD_D"])(_dkdv_plain)
    _dq_tuned = triton.autotune(_configs([
        (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
    ]), key=["T", "HEAD_D"])(_dq_plain)


# ----------------------------------------------------------------------------- launchers
def _head_consts(d, dtype):
    """Constexprs for the two-tile head-dim split (see the module docstring): 72 -> 64 + 16."""
    d0 = max(16, 1 << (d.bit_length() - 1))  # largest power of two <= d (tl.dot needs depth >= 16)
    rest = d - d0
    d1 = max(16, triton.next_power_of_2(rest)) if rest > 0 else 16  # unused tile still needs a shape
    if dtype == torch.float32:  # follow torch's own TF32 switch for fp32 matmuls
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        prec = "tf32"  # ignored for fp16/bf16 operands
    return dict(HEAD_D=d, D0=d0, D1=d1, HAS_D1=rest > 0, MASK_D0=d < d0, MASK_D1=d < d0 + d1,
                DOT_PREC=prec)


def _blocks(x):
    """Kernel + block sizes: autotuned on CUDA, one small fixed config in the interpreter."""
    return {} if x.is_cuda else {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}


def _unit_stride(*ts):
    """The kernels need a unit stride on the head dim; anything else is copied once."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _align(*ts):
    """Largest ALIGN in (8, 4, 2, 1) dividing every (b, h, t) stride of ts.

    Strides reach the kernels divided by ALIGN and are multiplied back by the constexpr there, so
    Triton can prove that every row starts on a 16-byte boundary (d = 72: a head offset of 72 elements
    is not a multiple of 16, and without the proof the loads fall back to 2-byte scalar accesses).
    """
    strides = [s for t in ts for s in t.stride()[:3]]
    return next(a for a in (8, 4, 2, 1) if all(s % a == 0 for s in strides))


def _strides(t, align):
    return [s // align for s in t.stride()[:3]]


def _bthd_empty(B, H, T, d, like):
    """(B, H, T, d) view of a fresh (B, T, H, d)-contiguous buffer."""
    return torch.empty(B, T, H, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def _flash_fwd_triton(q, k, v, scale):
    q, k, v = _unit_stride(q, k, v)
    B, H, T, d = q.shape
    out = _bthd_empty(B, H, T, d, q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    a = _align(q, k, v, out)
    kernel = _fwd_tuned if q.is_cuda else _fwd_plain
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    kernel[grid](q, k, v, out, lse, *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(out, a),
                 H, T, scale * LOG2E, **_head_consts(d, q.dtype), ALIGN=a, **_blocks(q))
    return out, lse


def _flash_bwd_triton(dout, q, k, v, out, lse, scale):
    dout, q, k, v, out = _unit_stride(dout, q, k, v, out)
    B, H, T, d = q.shape
    consts = _head_consts(d, q.dtype)
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    block = 64 if q.is_cuda else _INTERPRETER_BLOCK
    pre = {k_: consts[k_] for k_ in ("HEAD_D", "D0", "D1", "HAS_D1", "MASK_D0", "MASK_D1")}
    a = _align(out, dout)
    _bwd_preprocess_kernel[(triton.cdiv(T, block) * B * H,)](
        out, dout, delta, *_strides(out, a), *_strides(dout, a), H, T, **pre,
        MASK_T=T % block != 0, BLOCK_M=block, ALIGN=a)
    dq, dk, dv = (_bthd_empty(B, H, T, d, q) for _ in range(3))
    a = _align(q, k, v, dout, dq, dk, dv)
    common = (*_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(dout, a))
    dkdv = _dkdv_tuned if q.is_cuda else _dkdv_plain
    dkdv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]) * B * H,)](
        q, k, v, dout, lse, delta, dk, dv, *common, *_strides(dk, a), *_strides(dv, a),
        H, T, scale, scale * LOG2E, **consts, ALIGN=a, **_blocks(q))
    dq_kernel = _dq_tuned if q.is_cuda else _dq_plain
    dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)](
        q, k, v, dout, lse, delta, dq, *common, *_strides(dq, a),
        H, T, scale, scale * LOG2E, **consts, ALIGN=a, **_blocks(q))
    return dq, dk, dv


def _use_triton(x):
    # CPU tensors need interpreted kernels: TRITON_INTERPRET=1 set after this import is too late
    return triton is not None and triton_status(x.device)[0] and (x.is_cuda or _INTERPRETED)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dit_fast::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, T, d) in q.dtype, (B, T, H, d)-contiguous; lse (B, H, T) fp32)."""
    if _use_triton(q):
        return _flash_fwd_triton(q, k, v, softmax_scale)
    # reference path: torch.compile tracing and automatic fallback (dispatch raises for explicit asks)
    out, lse = attention_ref(q, k, v, softmax_scale, return_lse=True)
    B, H, T, d = q.shape
    return _bthd_empty(B, H, T, d, q).copy_(out), lse


@flash_attention_fwd.register_fake
def _(q, k, v, softmax_scale):
    B, H, T, d = q.shape
    return _bthd_empty(B, H, T, d, q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("dit_fast::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor,
                        softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, H, T, d) in q.dtype, (B, T, H, d)-contiguous."""
    if _use_triton(q):
        return _flash_bwd_triton(dout, q, k, v, out, lse, softmax_scale)
    B, H, T, d = q.shape
    grads = attention_bwd_ref(dout, q, k, v, out, lse, softmax_scale)
    return tuple(_bthd_empty(B, H, T, d, q).copy_(g) for g in grads)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale):
    B, H, T, d = q.shape
    return tuple(_bthd_empty(B, H, T, d, q) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale


def _backward(ctx, dout, dlse):
    # lse is an auxiliary output for the backward; gradients through it are not supported
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, ctx.softmax_scale)
    return dq, dk, dv, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function
def _check_inputs(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash_attention expects q, k, v of one shape (B, H, T, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention expects q, k, v of one dtype among float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype} (cast them first)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM or q.shape[-2] < 1:
        raise ValueError(f"flash_attention supports head dims 1..{MAX_HEAD_DIM} and T >= 1; got "
                         f"T={q.shape[-2]}, d={q.shape[-1]} (use the sdpa backend instead)")


def flash_attention(q, k, v, softmax_scale=None):
    """Non-causal attention softmax(q k^T * scale) v with the flash-attention kernels.

    q, k, v: (B, H, T, d) float16 / bfloat16 / float32 tensors on one device, any strides (views
    of a packed qkv projection are read in place); d <= 256, any T. softmax_scale defaults to d**-0.5.
    Returns (B, H, T, d) in q's dtype, a view of a (B, T, H, d)-contiguous buffer (so
    ``out.transpose(1, 2).reshape(B, T, H * d)`` is free). Differentiable in q, k, v. Runs the Triton
    kernels on CUDA, or on the CPU under TRITON_INTERPRET=1; elsewhere the fp32 reference (the
    dispatch layer decides whether that is acceptable).
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = flash_attention_fwd(q, k, v, scale)
    return out
