// selective_state_update (SPEC §1): one decoding step of the selective scan,
// updating the state in place. float32 arithmetic.
//
// The host prepends common.cuh (StateUpdateParams, Tensor4, ld_any, ...);
// this file includes nothing.
//
// ============================================================================
// KERNELS AND LAUNCH CONFIGURATION
// ============================================================================
// selective_state_update_{f32,f16,bf16}: suffix = dtype of x / dt / z / out.
// state may be float32 (usual), float16 or bfloat16 (params.state.dtype);
// A, B, C, D, dt_bias any float dtype; rows int32 or int64 (or ptr == 0).
//
//    T     = min(32, smallest power of two >= ceil(n / 16))  (threads per channel:
//            1 for n <= 16, 2 for n <= 32, ..., 16 for n <= 256)
//    grid  = (ceil(d * T / 128), b, 1)     (128 / T channels of one batch entry
//                                           per block)
//    block = (128, 1, 1)
//    dynamic shared memory = 0 (none used)
//    [Written for the defaults SSU_SPT = 16, SSU_ROWS = 1: in general
//     T = min(32, pow2ceil(ceil(n / SSU_SPT))), grid.y = ceil(b / SSU_ROWS).]
//
// Each thread owns SSU_SPT = 16 consecutive states of one (batch entry,
// channel) (for n > 16, T lanes share a channel; for n > 512 a lane also
// takes further groups of 16 at a stride of 16*T), so the per-channel work
// (softplus, gate, the loads of x, dt, z) is shared by as many states as
// possible, and every load is issued before any loaded value is used.
// Two paths, chosen per warp:
// * fast (the usual layout): n == 16, state and A float32, state, A, B, C
//   contiguous along n and 16-byte aligned: straight-line code, four 16-byte
//   loads each for state and A, two or four for B and C (f16/bf16 or f32).
//   G5 b64 (d4096 n16, 33.6 MB moved): 16.8 us on an H100, where a copy of
//   the same bytes takes 10 us; the general path took ~24 us (ncu: DRAM 12%
//   busy, instruction-bound).
// * general: any n, dtype and strides; 16-byte / 8-byte loads where the 4
//   states of a quad are contiguous and aligned, scalar loads otherwise; y
//   summed over the channel's T lanes with shuffles.
//
// rows (state_batch_indices): batch entry i uses state row r = rows[i]
// (r = i when rows.ptr == 0). r < 0: out = 0 and the state is untouched;
// r >= cache: out = NaN and the state is untouched (a device-side index the
// host cannot check without a sync). Two batch entries naming the same row
// race (as in mamba_ssm); the host need not check that.
// Strides are arbitrary (in elements); all offsets are 64-bit. groups_b and
// groups_c must be >= 1 and divide d (the (b, n) layout is groups = 1).
// ============================================================================

#ifndef SSU_THREADS
#define SSU_THREADS 128
#endif
#ifndef SSU_SPT
#define SSU_SPT 16  // states per thread (a multiple of 4)
#endif
#ifndef SSU_ROWS
#define SSU_ROWS 1  // batch entries per thread
#endif
#ifndef SSU_MIN_BLOCKS
#define SSU_MIN_BLOCKS 4  // __launch_bounds__ min blocks/SM: caps registers at 128
#endif
#define SSU_Q (SSU_SPT / 4)  // 4-state quads per thread

namespace ssu {

// Raw bits of one x / dt / z element: loaded first, converted when used.
template <int DT> struct Elem { typedef u16 S; };
template <> struct Elem<DT_F32> { typedef float S; };
template <int DT> __device__ __forceinline__ float to_f(typename Elem<DT>::S v);
template <> __device__ __forceinline__ float to_f<DT_F32>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<DT_F16>(u16 v) { return f16_to_f32(v); }
template <> __device__ __forceinline__ float to_f<DT_BF16>(u16 v) { return bf16_to_f32(v); }

// softplus of dt with mamba_ssm's threshold (x if x > 20 else log1p(exp(x))).
// f16/bf16 dt (SSU_FSP): two MUFU ops, log1p(y) = ln2 lg2(1 + y) plus the
// rounding that 1 + y lost, as the scan forward's 16-bit softplus (relative
// error ~1e-6, far below the input's precision); float32 dt: the libm pair.
// The precise pair is ~50 instructions that every lane of a channel runs,
// a large part of the decode step's issue time at b64.
#ifndef SSU_FSP
#define SSU_FSP 1
#endif
template <int DT>
__device__ __forceinline__ float softplus(float x) {
    if (DT == DT_F32 || !SSU_FSP) return x > 20.0f ? x : log1pf(expf(x));
    float y, l2;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    const float w = 1.0f + y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l2) : "f"(w));
    const float r = fmaf(l2, 0.6931471805599453f, (y - (w - 1.0f)) * (2.0f - w));
    return x > 20.0f ? x : r;
}

template <int DT> __device__ __forceinline__ void st(void* p, i64 i, float v);
template <> __device__ __forceinline__ void st<DT_F32>(void* p, i64 i, float v) { ((float*)p)[i] = v; }
template <> __device__ __forceinline__ void st<DT_F16>(void* p, i64 i, float v) { ((u16*)p)[i] = f32_to_f16(v); }
template <> __device__ __forceinline__ void st<DT_BF16>(void* p, i64 i, float v) { ((u16*)p)[i] = f32_to_bf16(v); }

__device__ __forceinline__ bool aligned(const void* p, unsigned long long a) {
    return (reinterpret_cast<unsigned long long>(p) & (a - 1)) == 0;
}

// Four consecutive-k elements of a tensor, as raw bits until used.
struct Quad {
    unsigned w[4];
    int kind;  // 0: f32 bits in w[0..3]; DT_F16 / DT_BF16: 4 halves packed in w[0..1]

    // x[off + i * ks] for i < kvalid (0 beyond). One 16-byte (f32) or 8-byte
    // (f16/bf16) load when the 4 are contiguous and aligned; else scalar
    // loads (converted at once: the slow path).
    __device__ __forceinline__ void load(const Tensor4& x, i64 off, i64 ks, int kvalid) {
        const bool full = ks == 1 && kvalid >= 4;
        if (x.dtype == DT_F32 && full && aligned((const float*)x.ptr + off, 16)) {
            const uint4 a = *reinterpret_cast<const uint4*>((const float*)x.ptr + off);
            w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
            kind = 0;
        } else if ((x.dtype == DT_BF16 || x.dtype == DT_F16) && full &&
                   aligned((const u16*)x.ptr + off, 8)) {
            const uint2 a = *reinterpret_cast<const uint2*>((const u16*)x.ptr + off);
            w[0] = a.x; w[1] = a.y; w[2] = 0; w[3] = 0;
            kind = x.dtype;
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++)
                w[i] = __float_as_uint(i < kvalid ? ld_any(x.ptr, x.dtype, off + i * ks) : 0.0f);
            kind = 0;
        }
    }
    __device__ __forceinline__ void zero() {
        w[0] = w[1] = w[2] = w[3] = 0;
        kind = 0;
    }
    __device__ __forceinline__ float get(int i) const {
        if (kind == 0) return __uint_as_float(w[i]);
        const u16 h = (u16)(w[i >> 1] >> ((i & 1) * 16));
        return kind == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
};

__device__ __forceinline__ void store4(const Tensor4& x, i64 off, i64 ks, int kvalid, const float (&v)[4]) {
    float* pf = (float*)x.ptr + off;
    if (x.dtype == DT_F32 && ks == 1 && kvalid >= 4 && aligned(pf, 16)) {
        *reinterpret_cast<float4*>(pf) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (i < kvalid) st_any((void*)x.ptr, x.dtype, off + i * ks, v[i]);
    }
}

__device__ __forceinline__ int threads_per_channel(int n) {
    const int q = (n + SSU_SPT - 1) / SSU_SPT;
    int T = 1;
    while (T < q && T < 32) T <<= 1;
    return T;
}

// 16 consecutive elements starting at p (16-byte aligned), f32 or 16-bit,
// as raw words: 4 or 2 16-byte loads, converted later by get16.
__device__ __forceinline__ void load16raw(uint4 (&w)[4], const void* p, int dtype) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    w[0] = q[0];
    w[1] = q[1];
    if (dtype == DT_F32) {
        w[2] = q[2];
        w[3] = q[3];
    }
}
// The 16 values of load16raw's words (branches on the dtype, never a run-time
// register index).
__device__ __forceinline__ void to16(float (&v)[16], const uint4 (&w)[4], int dtype) {
    if (dtype == DT_F32) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            v[4 * q] = __uint_as_float(w[q].x);
            v[4 * q + 1] = __uint_as_float(w[q].y);
            v[4 * q + 2] = __uint_as_float(w[q].z);
            v[4 * q + 3] = __uint_as_float(w[q].w);
        }
    } else {
        unsigned u[8] = {w[0].x, w[0].y, w[0].z, w[0].w, w[1].x, w[1].y, w[1].z, w[1].w};
        if (dtype == DT_BF16) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[2 * i] = __uint_as_float(u[i] << 16);
                v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[2 * i] = f16_to_f32((u16)(u[i] & 0xffff));
                v[2 * i + 1] = f16_to_f32((u16)(u[i] >> 16));
            }
        }
    }
}
// Whether 16 elements from element offset off of x can be read by load16raw.
__device__ __forceinline__ bool vec16_ok(const Tensor4& x, i64 off, i64 ks) {
    const int es = x.dtype == DT_F32 ? 4 : 2;
    return ks == 1 && (x.dtype == DT_F32 || x.dtype == DT_F16 || x.dtype == DT_BF16) &&
           aligned((const char*)x.ptr + off * es, 16);
}

template <int DT>
__device__ __forceinline__ void update(const StateUpdateParams& p) {
    typedef typename Elem<DT>::S S;
    const int T = threads_per_channel(p.n);
    const int tid = threadIdx.x;
    const int sub = tid & (T - 1);
    const int c_raw = blockIdx.x * (SSU_THREADS / T) + tid / T;
    const bool active = c_raw < p.d;
    const int c = active ? c_raw : p.d - 1;  // idle lanes still join the shuffles
    const float Dv = p.D.ptr ? ld_any(p.D.ptr, p.D.dtype, (i64)c * p.D.stride[0]) : 0.0f;
    const float bias = p.dt_bias.ptr ? ld_any(p.dt_bias.ptr, p.dt_bias.dtype, (i64)c * p.dt_bias.stride[0]) : 0.0f;
    const int gB = p.groups_b > 1 ? c / (p.d / p.groups_b) : 0;
    const int gC = p.groups_c > 1 ? c / (p.d / p.groups_c) : 0;

    // Per batch entry r: the state row (its own load when rows are given),
    // raw x, dt, z. An entry past b, or whose row is out of range, loads and
    // updates nothing (its lanes still join the shuffles).
    i64 row[SSU_ROWS];
    S xr[SSU_ROWS], dtr[SSU_ROWS], zr[SSU_ROWS];
    bool use[SSU_ROWS];
#pragma unroll
    for (int r = 0; r < SSU_ROWS; r++) {
        const int bi = min(blockIdx.y * SSU_ROWS + r, p.b - 1);
        const bool real = blockIdx.y * SSU_ROWS + r < p.b;
        row[r] = p.rows.ptr ? ld_index(p.rows.ptr, p.rows.dtype, (i64)bi * p.rows.stride[0]) : (i64)bi;
        xr[r] = ((const S*)p.x.ptr)[(i64)bi * p.x.stride[0] + (i64)c * p.x.stride[1]];
        dtr[r] = ((const S*)p.dt.ptr)[(i64)bi * p.dt.stride[0] + (i64)c * p.dt.stride[1]];
        zr[r] = p.z.ptr ? ((const S*)p.z.ptr)[(i64)bi * p.z.stride[0] + (i64)c * p.z.stride[1]] : S(0);
        use[r] = real && row[r] >= 0 && row[r] < p.cache;
        if (real && !use[r] && active && sub == 0)  // skipped (0) or out of range (NaN)
            st<DT>((void*)p.out.ptr, (i64)bi * p.out.stride[0] + (i64)c * p.out.stride[1],
                   row[r] < 0 ? 0.0f : __int_as_float(0x7fc00000));
    }

    float y[SSU_ROWS];
#pragma unroll
    for (int r = 0; r < SSU_ROWS; r++) y[r] = 0.0f;

    // Fast path (the usual layout): n == 16, one thread per channel, every
    // operand contiguous along n and 16-byte aligned: straight-line code with
    // 16-byte loads only. Taken per warp (it must agree for the shuffles of
    // the general path below).
    bool fast = false;
    if (SSU_ROWS == 1 && SSU_SPT == 16 && p.n == 16) {
        const int bi = min((int)blockIdx.y, p.b - 1);
        const i64 offS = row[0] * p.state.stride[0] + (i64)c * p.state.stride[1];
        const i64 offA = (i64)c * p.A.stride[0];
        const i64 offB = (i64)bi * p.B.stride[0] + (i64)gB * p.B.stride[1];
        const i64 offC = (i64)bi * p.C.stride[0] + (i64)gC * p.C.stride[1];
        const bool ok = !use[0] || (p.state.dtype == DT_F32 && vec16_ok(p.state, offS, p.state.stride[2]) &&
                                    p.A.dtype == DT_F32 && vec16_ok(p.A, offA, p.A.stride[1]) &&
                                    vec16_ok(p.B, offB, p.B.stride[2]) && vec16_ok(p.C, offC, p.C.stride[2]));
        fast = __all_sync(0xffffffffu, ok);
        if (fast && use[0]) {
            uint4 sw[4], aw[4], bw[4], cw[4];
            load16raw(sw, (const float*)p.state.ptr + offS, DT_F32);
            load16raw(aw, (const float*)p.A.ptr + offA, DT_F32);
            load16raw(bw, (const char*)p.B.ptr + offB * (p.B.dtype == DT_F32 ? 4 : 2), p.B.dtype);
            load16raw(cw, (const char*)p.C.ptr + offC * (p.C.dtype == DT_F32 ? 4 : 2), p.C.dtype);
            float dt = to_f<DT>(dtr[0]) + bias;
            if (p.softplus) dt = ssu::softplus<DT>(dt);
            const float dtx = dt * to_f<DT>(xr[0]);
            float sv[16], av[16], bv[16], cv[16];
            to16(sv, sw, DT_F32);
            to16(av, aw, DT_F32);
            to16(bv, bw, p.B.dtype);
            to16(cv, cw, p.C.dtype);
            float y0 = 0.0f, y1 = 0.0f;
#pragma unroll
            for (int k = 0; k < 16; k++) {
                sv[k] = fmaf(sv[k], __expf(dt * av[k]), bv[k] * dtx);
                if (k & 1) y1 = fmaf(cv[k], sv[k], y1);
                else y0 = fmaf(cv[k], sv[k], y0);
            }
            if (active) {
                float4* st4 = reinterpret_cast<float4*>((float*)p.state.ptr + offS);
#pragma unroll
                for (int q = 0; q < 4; q++) st4[q] = make_float4(sv[4 * q], sv[4 * q + 1], sv[4 * q + 2], sv[4 * q + 3]);
            }
            y[0] = y0 + y1;
        }
    }

    // General path: any n, dtype and strides.
    // Lane sub owns the SSU_SPT consecutive states from k0; another round
    // only when n > 32 * SSU_SPT.
#pragma unroll 1
    for (int k0 = SSU_SPT * sub; k0 < (fast ? 0 : p.n); k0 += SSU_SPT * T) {
        Quad a[SSU_Q];
#pragma unroll
        for (int q = 0; q < SSU_Q; q++)
            a[q].load(p.A, (i64)c * p.A.stride[0] + (k0 + 4 * q) * p.A.stride[1], p.A.stride[1],
                      p.n - k0 - 4 * q);
#pragma unroll
        for (int r = 0; r < SSU_ROWS; r++) {
            const int bi = min(blockIdx.y * SSU_ROWS + r, p.b - 1);
            const i64 offS = row[r] * p.state.stride[0] + (i64)c * p.state.stride[1];
            const i64 offB = (i64)bi * p.B.stride[0] + (i64)gB * p.B.stride[1];
            const i64 offC = (i64)bi * p.C.stride[0] + (i64)gC * p.C.stride[1];
            Quad sq[SSU_Q], bq[SSU_Q], cq[SSU_Q];
#pragma unroll
            for (int q = 0; q < SSU_Q; q++) {  // every load first
                const int k = k0 + 4 * q, kv = p.n - k;
                if (use[r] && kv > 0) {
                    sq[q].load(p.state, offS + k * p.state.stride[2], p.state.stride[2], kv);
                    bq[q].load(p.B, offB + k * p.B.stride[2], p.B.stride[2], kv);
                    cq[q].load(p.C, offC + k * p.C.stride[2], p.C.stride[2], kv);
                } else {
                    sq[q].zero();
                    bq[q].zero();
                    cq[q].zero();
                }
            }
            // then the arithmetic
            float dt = to_f<DT>(dtr[r]) + bias;
            if (p.softplus) dt = ssu::softplus<DT>(dt);
            const float dtx = dt * to_f<DT>(xr[r]);
#pragma unroll
            for (int q = 0; q < SSU_Q; q++) {
                const int k = k0 + 4 * q, kv = p.n - k;
                float s[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    s[i] = fmaf(sq[q].get(i), __expf(dt * a[q].get(i)), bq[q].get(i) * dtx);
                    // States past n (zeros) add nothing, even when dt·x is inf or
                    // NaN (0·inf = NaN): predicated, not summed.
                    if (i < kv) y[r] = fmaf(cq[q].get(i), s[i], y[r]);
                }
                if (use[r] && active && kv > 0)
                    store4(p.state, offS + k * p.state.stride[2], p.state.stride[2], kv, s);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SSU_ROWS; r++) {
        for (int o = 1; o < T; o <<= 1) y[r] += __shfl_xor_sync(0xffffffffu, y[r], o);
        if (use[r] && active && sub == 0) {
            const int bi = blockIdx.y * SSU_ROWS + r;
            const float x = to_f<DT>(xr[r]);
            float out = fmaf(Dv, x, y[r]);
            if (p.z.ptr) {
                const float z = to_f<DT>(zr[r]);
                out *= __fdividef(z, 1.0f + __expf(-z));
            }
            st<DT>((void*)p.out.ptr, (i64)bi * p.out.stride[0] + (i64)c * p.out.stride[1], out);
        }
    }
}

}  // namespace ssu

// ============================================================================
// selective_state_update_vec{1,R}_{f32,f16,bf16}: the vectorised kernel the
// host uses for the usual layout (src/cuda/scan.rs checks all of this first):
//   state and A float32; n in {4, 8, 16, 32, 64, 128}; state, A, B, C
//   contiguous along n; every 4-state quad 16-byte aligned (state, A, f32
//   B/C) or 8-byte aligned (f16/bf16 B/C): pointer and every other stride a
//   multiple of 4 elements. B/C may be f32, f16 or bf16 (both the same or
//   not); D, dt_bias any float dtype; rows int32/int64 or none; any groups.
//
//    T     = n / 4                  (lanes per channel, one 4-state quad each)
//    R     = 1 (vec1) or SSU_VR (vecR; batch entries per thread)
//    grid  = (ceil(d * T / SSU_VTHREADS), ceil(b / R), 1)
//    block = (SSU_VTHREADS = 128, 1, 1), no shared memory
//
// Consecutive lanes hold consecutive quads of one channel's contiguous row,
// so each warp load or store instruction moves 512 contiguous bytes of state
// (the 16-state-per-thread fast path above moves 16 bytes at a 64-byte pitch
// per instruction). Each thread issues all its loads (R state quads, the A
// quad, R x B/C quads, x/dt/z) before using any; y is reduced over the T
// lanes of a channel with shuffles (T divides 32, so channels never straddle
// warps). Every lane of a channel computes the channel's softplus (cheaper
// than sharing it by shuffle).
// ============================================================================

#ifndef SSU_VTHREADS
#define SSU_VTHREADS 128
#endif
#ifndef SSU_VR
#define SSU_VR 2  // batch entries per thread of the vecR kernel
#endif
#ifndef SSU_VCACHE
#define SSU_VCACHE 0  // 1: state loaded / stored with the evict-first (.cs) hint
#endif

namespace ssuv {

__device__ __forceinline__ float4 ld_state(const float* p) {
#if SSU_VCACHE == 1
    return __ldcs(reinterpret_cast<const float4*>(p));
#else
    return *reinterpret_cast<const float4*>(p);
#endif
}
__device__ __forceinline__ void st_state(float* p, float4 v) {
#if SSU_VCACHE == 1
    __stcs(reinterpret_cast<float4*>(p), v);
#else
    *reinterpret_cast<float4*>(p) = v;
#endif
}

// 4 consecutive B/C values of dtype dt (f32: one 16-byte load; 16-bit: 8 bytes).
struct Q4 {
    uint4 w;
};
__device__ __forceinline__ Q4 ld_q4(const void* base, int dt, i64 off) {
    Q4 q;
    if (dt == DT_F32) {
        q.w = *reinterpret_cast<const uint4*>((const float*)base + off);
    } else {
        const uint2 h = *reinterpret_cast<const uint2*>((const u16*)base + off);
        q.w = make_uint4(h.x, h.y, 0u, 0u);
    }
    return q;
}
__device__ __forceinline__ void to4(float (&v)[4], const Q4& q, int dt) {
    if (dt == DT_F32) {
        v[0] = __uint_as_float(q.w.x);
        v[1] = __uint_as_float(q.w.y);
        v[2] = __uint_as_float(q.w.z);
        v[3] = __uint_as_float(q.w.w);
    } else if (dt == DT_BF16) {
        v[0] = __uint_as_float(q.w.x << 16);
        v[1] = __uint_as_float(q.w.x & 0xffff0000u);
        v[2] = __uint_as_float(q.w.y << 16);
        v[3] = __uint_as_float(q.w.y & 0xffff0000u);
    } else {
        v[0] = f16_to_f32((u16)(q.w.x & 0xffffu));
        v[1] = f16_to_f32((u16)(q.w.x >> 16));
        v[2] = f16_to_f32((u16)(q.w.y & 0xffffu));
        v[3] = f16_to_f32((u16)(q.w.y >> 16));
    }
}

template <int DT, int R>
__device__ __forceinline__ void update_vec(const StateUpdateParams& p) {
    typedef typename ssu::Elem<DT>::S S;
    const int T = p.n >> 2;  // 1..32, a power of two (host-checked)
    const int gid = blockIdx.x * SSU_VTHREADS + threadIdx.x;
    const int c_raw = gid / T;
    const int k = (gid & (T - 1)) * 4;
    const bool active = c_raw < p.d;
    const int c = active ? c_raw : p.d - 1;  // idle lanes still join the shuffles
    const int gB = p.groups_b > 1 ? c / (p.d / p.groups_b) : 0;
    const int gC = p.groups_c > 1 ? c / (p.d / p.groups_c) : 0;

    // every load first
    const float4 a4 = *reinterpret_cast<const float4*>((const float*)p.A.ptr + (i64)c * p.A.stride[0] + k);
    const float Dv = p.D.ptr ? ld_any(p.D.ptr, p.D.dtype, (i64)c * p.D.stride[0]) : 0.0f;
    const float bias = p.dt_bias.ptr ? ld_any(p.dt_bias.ptr, p.dt_bias.dtype, (i64)c * p.dt_bias.stride[0]) : 0.0f;
    i64 row[R];
    bool use[R];
    S xr[R], dtr[R], zr[R];
    float4 s4[R];
    Q4 bq[R], cq[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int bi_raw = blockIdx.y * R + r;
        const bool real = bi_raw < p.b;
        const int bi = real ? bi_raw : p.b - 1;
        row[r] = p.rows.ptr ? ld_index(p.rows.ptr, p.rows.dtype, (i64)bi * p.rows.stride[0]) : (i64)bi;
        use[r] = real && row[r] >= 0 && row[r] < p.cache;
        const i64 rs = use[r] ? row[r] : 0;
        xr[r] = ((const S*)p.x.ptr)[(i64)bi * p.x.stride[0] + (i64)c * p.x.stride[1]];
        dtr[r] = ((const S*)p.dt.ptr)[(i64)bi * p.dt.stride[0] + (i64)c * p.dt.stride[1]];
        zr[r] = p.z.ptr ? ((const S*)p.z.ptr)[(i64)bi * p.z.stride[0] + (i64)c * p.z.stride[1]] : S(0);
        s4[r] = ld_state((const float*)p.state.ptr + rs * p.state.stride[0] + (i64)c * p.state.stride[1] + k);
        bq[r] = ld_q4(p.B.ptr, p.B.dtype, (i64)bi * p.B.stride[0] + (i64)gB * p.B.stride[1] + k);
        cq[r] = ld_q4(p.C.ptr, p.C.dtype, (i64)bi * p.C.stride[0] + (i64)gC * p.C.stride[1] + k);
    }
    // then the arithmetic
    const float av[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int bi_raw = blockIdx.y * R + r;
        float dt = ssu::to_f<DT>(dtr[r]) + bias;
        if (p.softplus) dt = ssu::softplus<DT>(dt);
        const float x = ssu::to_f<DT>(xr[r]);
        const float dtx = dt * x;
        float bv[4], cv[4];
        to4(bv, bq[r], p.B.dtype);
        to4(cv, cq[r], p.C.dtype);
        float sv[4] = {s4[r].x, s4[r].y, s4[r].z, s4[r].w};
        float y = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            sv[i] = fmaf(sv[i], __expf(dt * av[i]), bv[i] * dtx);
            y = fmaf(cv[i], sv[i], y);
        }
        if (use[r] && active)
            st_state((float*)p.state.ptr + row[r] * p.state.stride[0] + (i64)c * p.state.stride[1] + k,
                     make_float4(sv[0], sv[1], sv[2], sv[3]));
        for (int o = 1; o < T; o <<= 1) y += __shfl_xor_sync(0xffffffffu, y, o);
        if (active && k == 0 && bi_raw < p.b) {
            float out;
            if (use[r]) {
                out = fmaf(Dv, x, y);
                if (p.z.ptr) {
                    const float z = ssu::to_f<DT>(zr[r]);
                    out *= __fdividef(z, 1.0f + __expf(-z));
                }
            } else {
                out = row[r] < 0 ? 0.0f : __int_as_float(0x7fc00000);  // skipped / out of range
            }
            ssu::st<DT>((void*)p.out.ptr, (i64)bi_raw * p.out.stride[0] + (i64)c * p.out.stride[1], out);
        }
    }
}

}  // namespace ssuv

extern "C" __global__ void __launch_bounds__(SSU_VTHREADS)
selective_state_update_vec1_f32(const __grid_constant__ StateUpdateParams p) { ssuv::update_vec<DT_F32, 1>(p); }

extern "C" __global__ void __launch_bounds__(SSU_VTHREADS)
selective_state_update_vec1_f16(const __grid_constant__ StateUpdateParams p) { ssuv::update_vec<DT_F16, 1>(p); }

extern "C" __global__ void __launch_bounds__(SSU_VTHREADS)
selective_state_update_vec1_bf16(const __grid_constant__ StateUpdateParams p) { ssuv::update_vec<DT_BF16, 1>(p); }

extern "C" __global__ void __launch_bounds__(SSU_VTHREADS)
selective_state_update_vecR_f32(const __grid_constant__ StateUpdateParams p) { ssuv::update_vec<DT_F32, SSU_VR>(p); }

extern "C" __global__ void __launch_bounds__(SSU_VTHREADS)
selective_state_update_vecR_f16(const __grid_constant__ StateUpdateParams p) { ssuv::update_vec<DT_F16, SSU_VR>(p); }

extern "C" __global__ void __launch_bounds__(SSU_VTHREADS)
selective_state_update_vecR_bf16(const __grid_constant__ StateUpdateParams p) { ssuv::update_vec<DT_BF16, SSU_VR>(p); }

extern "C" __global__ void __launch_bounds__(SSU_THREADS, SSU_MIN_BLOCKS)
selective_state_update_f32(const __grid_constant__ StateUpdateParams p) { ssu::update<DT_F32>(p); }

extern "C" __global__ void __launch_bounds__(SSU_THREADS, SSU_MIN_BLOCKS)
selective_state_update_f16(const __grid_constant__ StateUpdateParams p) { ssu::update<DT_F16>(p); }

extern "C" __global__ void __launch_bounds__(SSU_THREADS, SSU_MIN_BLOCKS)
selective_state_update_bf16(const __grid_constant__ StateUpdateParams p) { ssu::update<DT_BF16>(p); }
