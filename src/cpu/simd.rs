//! One vector abstraction over AVX-512, AVX2+FMA and portable code.
//!
//! Kernels are written once, generic over [`Simd`], marked `#[inline(always)]`,
//! and instantiated inside `#[target_feature]` entry points (see `cpu::dispatch`),
//! so every intrinsic is inlined into code compiled for the right ISA.
//! Transcendentals (`exp`, `log1p`, `sigmoid`) are built here from the
//! primitives, with polynomials accurate to float32 rounding (≈1 ulp).

/// log2(e), used to turn exp(x) into exp2(x·log2 e).
pub const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Coefficients of 2^f on [-0.5, 0.5], degree 6 (Chebyshev least-squares fit,
/// max relative error 1.0e-7 when evaluated in float32 by Horner's rule).
const EXP2_C: [f32; 7] = [
    1.0,
    0.693_147_2,
    0.240_226_5,
    0.055_503_27,
    0.009_618_025,
    0.001_340_043_7,
    0.000_154_697_37,
];

/// Coefficients of 2^f on [-0.5, 0.5], degree 5, with c0 = 1 and c1 = ln 2
/// held fixed (so decays exp(Δ·A) close to 1 keep their rate exactly); max
/// relative error 1.9e-7 in float32. One FMA fewer than [`EXP2_C`], for the
/// scan's inner loop, where exp(Δ·A) is most of the arithmetic.
const EXP2_C5: [f32; 6] = [
    1.0,
    0.693_147_2,
    0.240_222_81,
    0.055_505_6,
    0.009_669_709,
    0.001_330_026_4,
];

/// Coefficients of 2^f on [-0.5, 0.5], degree 4 (relative-error minimax by
/// iteratively reweighted least squares): max relative error 2.7e-6 in
/// float32 Horner. For attention's softmax only, where each probability's
/// relative error reaches the output at most twice (numerator and sum),
/// ≪ the 1e-4 tolerance; one FMA fewer per score than [`EXP2_C5`].
const EXP2_C4: [f32; 5] = [
    0.999_999_3,
    0.693_121_8,
    0.240_247_44,
    0.055_917_855,
    0.009_570_087,
];

/// A vector of `LANES` float32 values and the operations the kernels need.
///
/// # Safety
/// Every method may execute ISA-specific instructions; callers must only use an
/// implementation whose CPU features were detected at run time (`cpu::dispatch`).
pub unsafe trait Simd: Copy + Send + Sync + 'static {
    const LANES: usize;
    const NAME: &'static str;
    type V: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// a·b + c, fused where the ISA has FMA.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn abs(a: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn hsum(a: Self::V) -> f32;
    /// Lane-wise `if x > t { a } else { b }`.
    unsafe fn select_gt(x: Self::V, t: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// Round to the nearest integer (ties to even).
    unsafe fn round(x: Self::V) -> Self::V;
    /// p·2^n for integral n in [-150, 128] (denormal results and +inf included).
    unsafe fn scale2(p: Self::V, n: Self::V) -> Self::V;
    /// Lane-wise `if x is NaN { x } else { r }`.
    unsafe fn keep_nan(x: Self::V, r: Self::V) -> Self::V;
    /// `v` with lanes `count..` set to +0.0 whatever their bits (NaN and inf
    /// included), lanes `..count` unchanged; `count` ≤ `LANES`. A blend, not
    /// a branch: the tail of a row or state vector padded to whole vectors
    /// goes through it before anything sums across lanes or carries the
    /// padding on, so the padding contributes nothing (DESIGN.md: tail lanes
    /// contribute nothing, whatever their values).
    unsafe fn keep_first(v: Self::V, count: usize) -> Self::V;

    /// 2^x: overflow gives +inf, underflow 0, NaN stays NaN; ≈1 ulp.
    #[inline(always)]
    unsafe fn exp2(x: Self::V) -> Self::V {
        let xc = Self::min(Self::splat(EXP2_HI), Self::max(Self::splat(EXP2_LO), x));
        let n = Self::round(xc);
        let r = Self::scale2(Self::exp2_poly(Self::sub(xc, n)), n);
        Self::keep_nan(x, r)
    }

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        Self::splat(0.0)
    }

    /// Horner evaluation of c[0] + c[1] f + … + c[N-1] f^(N-1).
    #[inline(always)]
    unsafe fn horner<const N: usize>(f: Self::V, c: &[f32; N]) -> Self::V {
        let mut p = Self::splat(c[N - 1]);
        for i in (0..N - 1).rev() {
            p = Self::fma(p, f, Self::splat(c[i]));
        }
        p
    }

    /// Horner evaluation of the 2^f polynomial, f in [-0.5, 0.5].
    #[inline(always)]
    unsafe fn exp2_poly(f: Self::V) -> Self::V {
        Self::horner(f, &EXP2_C)
    }

    /// 2^x for finite (or NaN) x: `exp2` without the range clamps where the
    /// ISA's scaling instruction already covers every exponent (AVX-512).
    #[inline(always)]
    unsafe fn exp2_fast(x: Self::V) -> Self::V {
        Self::exp2(x)
    }

    /// 2^x to 2.7e-6 relative (degree-4 polynomial, [`EXP2_C4`]) for x in
    /// [-150, 0] or NaN: the softmax's probabilities.
    #[inline(always)]
    unsafe fn exp2_attn(x: Self::V) -> Self::V {
        let xc = Self::max(Self::splat(EXP2_LO), x);
        let n = Self::round(xc);
        let p = Self::horner(Self::sub(xc, n), &EXP2_C4);
        Self::keep_nan(x, Self::scale2(p, n))
    }

    /// Whether `transpose8` is the AVX version (else the scalar loop).
    const AVX: bool = false;

    /// Copies an 8×8 float32 block: dst[i][j] = src[j][i], rows `ss` / `ds`
    /// elements apart.
    #[inline(always)]
    unsafe fn transpose8(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
        for i in 0..8isize {
            for j in 0..8isize {
                *dst.offset(i * ds + j) = *src.offset(j * ss + i);
            }
        }
    }

    /// e^x with Cody-Waite reduction (x − n·ln 2 in two FMAs), so the error
    /// does not grow with |x|: ≈1 ulp.
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        let xc = Self::min(Self::splat(EXP_HI), Self::max(Self::splat(EXP_LO), x));
        let n = Self::round(Self::mul(xc, Self::splat(LOG2E)));
        let r = Self::fma(n, Self::splat(-LN2_HI), xc);
        let r = Self::fma(n, Self::splat(-LN2_LO), r);
        let p = Self::exp2_poly(Self::mul(r, Self::splat(LOG2E)));
        Self::keep_nan(x, Self::scale2(p, n))
    }

    /// log(1 + y) for y ≥ 0, as 2·atanh(s) with s = y / (2 + y) ∈ [0, 1/3):
    /// no cancellation for small y, relative error ≈ 1e-7.
    #[inline(always)]
    unsafe fn log1p_pos(y: Self::V) -> Self::V {
        let s = Self::div(y, Self::add(Self::splat(2.0), y));
        let s2 = Self::mul(s, s);
        // 2·(s + s³/3 + s⁵/5 + … + s¹⁵/15): truncation error < 2e-9 relative.
        let mut p = Self::splat(2.0 / 15.0);
        p = Self::fma(p, s2, Self::splat(2.0 / 13.0));
        p = Self::fma(p, s2, Self::splat(2.0 / 11.0));
        p = Self::fma(p, s2, Self::splat(2.0 / 9.0));
        p = Self::fma(p, s2, Self::splat(2.0 / 7.0));
        p = Self::fma(p, s2, Self::splat(2.0 / 5.0));
        p = Self::fma(p, s2, Self::splat(2.0 / 3.0));
        p = Self::fma(p, s2, Self::splat(2.0));
        Self::mul(p, s)
    }

    /// mamba_ssm's softplus: x if x > 20 else log1p(exp(x)),
    /// computed as max(x, 0) + log1p(exp(-|x|)).
    #[inline(always)]
    unsafe fn softplus(x: Self::V) -> Self::V {
        let e = Self::exp(Self::sub(Self::zero(), Self::abs(x)));
        let sp = Self::add(Self::max(x, Self::zero()), Self::log1p_pos(e));
        Self::select_gt(x, Self::splat(20.0), x, sp)
    }

    /// x · sigmoid(x) = x / (1 + exp(-x)).
    #[inline(always)]
    unsafe fn silu(x: Self::V) -> Self::V {
        let e = Self::exp(Self::sub(Self::zero(), x));
        Self::div(x, Self::add(Self::splat(1.0), e))
    }
}

/// Clamp range for exp2 arguments: below -150 the result is 0, above 128 it is inf.
const EXP2_LO: f32 = -150.0;
const EXP2_HI: f32 = 128.0;
/// The same range for exp's argument.
const EXP_LO: f32 = -104.0;
const EXP_HI: f32 = 89.0;
/// ln 2 split so that n·LN2_HI is exact for |n| < 2^9.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

// ---------------------------------------------------------------- portable
/// Portable fallback: 8 lanes of plain Rust arithmetic (the compiler vectorises
/// it with the baseline SSE2), same polynomials as the SIMD levels.
#[derive(Clone, Copy)]
pub struct Portable;

const PL: usize = 8;

#[inline(always)]
fn map1(a: [f32; PL], f: impl Fn(f32) -> f32) -> [f32; PL] {
    let mut r = [0.0; PL];
    for i in 0..PL {
        r[i] = f(a[i]);
    }
    r
}

#[inline(always)]
fn map2(a: [f32; PL], b: [f32; PL], f: impl Fn(f32, f32) -> f32) -> [f32; PL] {
    let mut r = [0.0; PL];
    for i in 0..PL {
        r[i] = f(a[i], b[i]);
    }
    r
}

unsafe impl Simd for Portable {
    const LANES: usize = PL;
    const NAME: &'static str = "portable";
    type V = [f32; PL];

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; PL]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; PL])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; PL], v)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        let mut r = [0.0; PL];
        for i in 0..PL {
            r[i] = a[i] * b[i] + c[i];
        }
        r
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    unsafe fn abs(a: Self::V) -> Self::V {
        map1(a, f32::abs)
    }
    #[inline(always)]
    unsafe fn hsum(a: Self::V) -> f32 {
        a.iter().sum()
    }
    #[inline(always)]
    unsafe fn select_gt(x: Self::V, t: Self::V, a: Self::V, b: Self::V) -> Self::V {
        let mut r = [0.0; PL];
        for i in 0..PL {
            r[i] = if x[i] > t[i] { a[i] } else { b[i] };
        }
        r
    }
    #[inline(always)]
    unsafe fn round(x: Self::V) -> Self::V {
        map1(x, |v| v.round_ties_even())
    }
    #[inline(always)]
    unsafe fn scale2(p: Self::V, n: Self::V) -> Self::V {
        map2(p, n, |p, n| {
            let n = n as i32;
            let h = n >> 1;
            p * pow2i(h) * pow2i(n - h)
        })
    }
    #[inline(always)]
    unsafe fn keep_nan(x: Self::V, r: Self::V) -> Self::V {
        map2(x, r, |x, r| if x.is_nan() { x } else { r })
    }
    #[inline(always)]
    unsafe fn keep_first(v: Self::V, count: usize) -> Self::V {
        let mut r = [0.0; PL];
        for i in 0..PL {
            r[i] = if i < count { v[i] } else { 0.0 };
        }
        r
    }
}

/// 2^n for n in [-126, 127] as a float built from its exponent bits
/// (callers keep n in range).
#[inline(always)]
fn pow2i(n: i32) -> f32 {
    if n < -126 {
        0.0
    } else if n > 127 {
        f32::INFINITY
    } else {
        f32::from_bits(((n + 127) as u32) << 23)
    }
}

// ---------------------------------------------------------------- x86-64
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// 8×8 transpose in registers (unpack, shuffle, 128-bit permute: 24 ops
    /// instead of 64 scalar loads and stores).
    #[inline(always)]
    pub(super) unsafe fn transpose8_avx(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
        let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(src.offset(j as isize * ss)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, v) in o.iter().enumerate() {
            _mm256_storeu_ps(dst.offset(i as isize * ds), *v);
        }
    }

    /// `Avx2::keep_first`'s masks: 8 lanes from index 8 − count.
    static TAIL_MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    /// AVX2 + FMA: 8 lanes.
    #[derive(Clone, Copy)]
    pub struct Avx2;

    unsafe impl Simd for Avx2 {
        const LANES: usize = 8;
        const NAME: &'static str = "avx2";
        const AVX: bool = true;
        type V = __m256;

        #[inline(always)]
        unsafe fn transpose8(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
            transpose8_avx(src, ss, dst, ds)
        }

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn abs(a: __m256) -> __m256 {
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), a)
        }
        #[inline(always)]
        unsafe fn hsum(a: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn select_gt(x: __m256, t: __m256, a: __m256, b: __m256) -> __m256 {
            _mm256_blendv_ps(b, a, _mm256_cmp_ps::<_CMP_GT_OQ>(x, t))
        }
        #[inline(always)]
        unsafe fn round(x: __m256) -> __m256 {
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
        }
        #[inline(always)]
        unsafe fn scale2(p: __m256, n: __m256) -> __m256 {
            // 2^n = 2^h · 2^(n-h) with h = n >> 1: both factors are normal
            // floats for n in [-150, 128], built from exponent bits.
            let ni = _mm256_cvtps_epi32(n);
            let h = _mm256_srai_epi32::<1>(ni);
            let bias = _mm256_set1_epi32(127);
            let f1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(h, bias)));
            let f2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_sub_epi32(ni, h),
                bias,
            )));
            _mm256_mul_ps(_mm256_mul_ps(p, f1), f2)
        }
        #[inline(always)]
        unsafe fn keep_nan(x: __m256, r: __m256) -> __m256 {
            _mm256_blendv_ps(r, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
        }
        #[inline(always)]
        unsafe fn keep_first(v: __m256, count: usize) -> __m256 {
            // All-ones in the first `count` lanes: an unaligned window of a
            // [-1 × 8, 0 × 8] table; AND clears the rest whatever their bits.
            let m = _mm256_loadu_si256(TAIL_MASK.as_ptr().add(8 - count) as *const __m256i);
            _mm256_and_ps(v, _mm256_castsi256_ps(m))
        }
    }

    /// AVX-512F: 16 lanes, exp2 through vscalefps.
    #[derive(Clone, Copy)]
    pub struct Avx512;

    unsafe impl Simd for Avx512 {
        const LANES: usize = 16;
        const NAME: &'static str = "avx512";
        const AVX: bool = true;
        type V = __m512;

        #[inline(always)]
        unsafe fn transpose8(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
            transpose8_avx(src, ss, dst, ds)
        }
        #[inline(always)]
        unsafe fn exp2_fast(x: __m512) -> __m512 {
            // n = round(x) and f = x − n ∈ [−½, ½] (exact; vreduceps, so
            // ±inf gives f = 0, not NaN), the degree-5 polynomial, and
            // vscalefps(p, n) multiplies by 2^n itself: 0 / inf out of range,
            // NaN for NaN.
            // Rounding to nearest, not down (vreduceps): for small negative x,
            // x − floor(x) lands near 1 and loses x's low bits, an error that
            // compounds over a long recurrence of decays exp(Δ·A).
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let n = _mm512_roundscale_ps::<NEAREST>(x);
            let f = _mm512_reduce_ps::<NEAREST>(x);
            _mm512_scalef_ps(Self::horner(f, &EXP2_C5), n)
        }

        #[inline(always)]
        unsafe fn exp2_attn(x: __m512) -> __m512 {
            // As `exp2_fast`, with the degree-4 polynomial.
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let n = _mm512_roundscale_ps::<NEAREST>(x);
            let f = _mm512_reduce_ps::<NEAREST>(x);
            _mm512_scalef_ps(Self::horner(f, &EXP2_C4), n)
        }

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn abs(a: __m512) -> __m512 {
            _mm512_abs_ps(a)
        }
        #[inline(always)]
        unsafe fn hsum(a: __m512) -> f32 {
            _mm512_reduce_add_ps(a)
        }
        #[inline(always)]
        unsafe fn select_gt(x: __m512, t: __m512, a: __m512, b: __m512) -> __m512 {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, t), b, a)
        }
        #[inline(always)]
        unsafe fn round(x: __m512) -> __m512 {
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
        }
        #[inline(always)]
        unsafe fn scale2(p: __m512, n: __m512) -> __m512 {
            _mm512_scalef_ps(p, n)
        }
        #[inline(always)]
        unsafe fn keep_nan(x: __m512, r: __m512) -> __m512 {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), r, x)
        }
        #[inline(always)]
        unsafe fn keep_first(v: __m512, count: usize) -> __m512 {
            _mm512_maskz_mov_ps(((1u32 << count) - 1) as __mmask16, v)
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(test)]
mod tests {
    use super::*;

    fn check_level<S: Simd>() {
        unsafe {
            let mut worst_exp: f64 = 0.0;
            let mut worst_sp: f64 = 0.0;
            let mut worst_silu: f64 = 0.0;
            let mut buf = vec![0.0f32; S::LANES];
            let mut i = 0usize;
            let xs: Vec<f32> = (0..200_000)
                .map(|k| -87.0 + 175.0 * k as f32 / 200_000.0)
                .collect();
            while i + S::LANES <= xs.len() {
                let v = S::load(xs.as_ptr().add(i));
                S::store(buf.as_mut_ptr(), S::exp(v));
                for j in 0..S::LANES {
                    let x = xs[i + j] as f64;
                    let r = x.exp();
                    worst_exp = worst_exp.max(((buf[j] as f64 - r) / r).abs());
                }
                S::store(buf.as_mut_ptr(), S::softplus(v));
                for j in 0..S::LANES {
                    let x = xs[i + j] as f64;
                    let r = if x > 20.0 { x } else { x.exp().ln_1p() };
                    worst_sp = worst_sp.max(((buf[j] as f64 - r) / r).abs());
                }
                S::store(buf.as_mut_ptr(), S::silu(v));
                for j in 0..S::LANES {
                    let x = xs[i + j] as f64;
                    let r = x / (1.0 + (-x).exp());
                    if r.abs() > 1e-30 {
                        worst_silu = worst_silu.max(((buf[j] as f64 - r) / r).abs());
                    }
                }
                i += S::LANES;
            }
            assert!(worst_exp < 4e-7, "{} exp rel err {worst_exp}", S::NAME);
            let mut worst_exp2: f64 = 0.0;
            for k in 0..S::LANES * 10_000 {
                let x = -126.0 + 253.0 * k as f32 / (S::LANES * 10_000) as f32;
                S::store(buf.as_mut_ptr(), S::exp2(S::splat(x)));
                let r = (x as f64).exp2();
                worst_exp2 = worst_exp2.max(((buf[0] as f64 - r) / r).abs());
            }
            assert!(worst_exp2 < 2.5e-7, "{} exp2 rel err {worst_exp2}", S::NAME);
            let mut worst_fast: f64 = 0.0;
            for k in 0..S::LANES * 10_000 {
                let x = -149.0 + 276.0 * k as f32 / (S::LANES * 10_000) as f32;
                S::store(buf.as_mut_ptr(), S::exp2_fast(S::splat(x)));
                let r = (x as f64).exp2();
                // Subnormal results: one subnormal ulp of rounding on top of
                // the polynomial's relative error.
                let tol = if x < -126.0 {
                    2f64.powi(-149) + 2.5e-7 * r
                } else {
                    2.5e-7 * r
                };
                worst_fast = worst_fast.max((buf[0] as f64 - r).abs() / tol * 2.5e-7);
            }
            assert!(
                worst_fast < 2.5e-7,
                "{} exp2_fast rel err {worst_fast}",
                S::NAME
            );
            for (x, want) in [
                (f32::NEG_INFINITY, 0.0f32),
                (-1e30, 0.0),
                (-151.0, 0.0),
                (f32::INFINITY, f32::INFINITY),
                (1e30, f32::INFINITY),
                (0.0, 1.0),
                (-1e-30, 1.0),
            ] {
                S::store(buf.as_mut_ptr(), S::exp2_fast(S::splat(x)));
                assert!(buf[0] == want, "{} exp2_fast({x}) = {}", S::NAME, buf[0]);
            }
            S::store(buf.as_mut_ptr(), S::exp2_fast(S::splat(f32::NAN)));
            assert!(buf[0].is_nan(), "{} exp2_fast(NaN) = {}", S::NAME, buf[0]);
            // exp2_attn: the softmax's 2^(s − max) over [-150, 0].
            let mut worst_attn: f64 = 0.0;
            for k in 0..S::LANES * 10_000 {
                let x = -126.0 * k as f32 / (S::LANES * 10_000) as f32;
                S::store(buf.as_mut_ptr(), S::exp2_attn(S::splat(x)));
                let r = (x as f64).exp2();
                worst_attn = worst_attn.max(((buf[0] as f64 - r) / r).abs());
            }
            assert!(
                worst_attn < 3e-6,
                "{} exp2_attn rel err {worst_attn}",
                S::NAME
            );
            for (x, want) in [
                (f32::NEG_INFINITY, 0.0f32),
                (-1e30, 0.0),
                (-151.0, 0.0),
                (0.0, 0.999_999_3),
            ] {
                S::store(buf.as_mut_ptr(), S::exp2_attn(S::splat(x)));
                assert!(buf[0] == want, "{} exp2_attn({x}) = {}", S::NAME, buf[0]);
            }
            S::store(buf.as_mut_ptr(), S::exp2_attn(S::splat(f32::NAN)));
            assert!(buf[0].is_nan(), "{} exp2_attn(NaN) = {}", S::NAME, buf[0]);
            // keep_first: lanes ..count bitwise unchanged, lanes count.. +0.0,
            // whatever they held (NaN, inf).
            let junk: Vec<f32> = (0..S::LANES)
                .map(|j| [f32::NAN, f32::INFINITY, -1.5, f32::NEG_INFINITY][j % 4])
                .collect();
            for count in 0..=S::LANES {
                S::store(
                    buf.as_mut_ptr(),
                    S::keep_first(S::load(junk.as_ptr()), count),
                );
                for j in 0..S::LANES {
                    let want = if j < count { junk[j].to_bits() } else { 0 };
                    assert!(
                        buf[j].to_bits() == want,
                        "{} keep_first(count {count}) lane {j} = {}",
                        S::NAME,
                        buf[j]
                    );
                }
            }
            assert!(worst_sp < 4e-7, "{} softplus rel err {worst_sp}", S::NAME);
            assert!(worst_silu < 6e-7, "{} silu rel err {worst_silu}", S::NAME);

            // Edge cases: far underflow, overflow, NaN.
            let edge = [
                -1e30f32,
                -200.0,
                200.0,
                f32::NAN,
                f32::NEG_INFINITY,
                f32::INFINITY,
                0.0,
                1.0,
            ];
            let mut inp = vec![0.0f32; S::LANES];
            for (k, e) in edge.iter().enumerate() {
                inp[k % S::LANES] = *e;
                if k % S::LANES == S::LANES - 1 || k == edge.len() - 1 {
                    S::store(buf.as_mut_ptr(), S::exp(S::load(inp.as_ptr())));
                    for j in 0..S::LANES {
                        let x = inp[j];
                        let got = buf[j];
                        if x.is_nan() {
                            assert!(got.is_nan(), "{} exp(NaN)", S::NAME);
                        } else if x >= 200.0 {
                            assert!(got == f32::INFINITY, "{} exp({x}) = {got}", S::NAME);
                        } else if x <= -200.0 {
                            assert!(got.abs() < 1.2e-38, "{} exp({x}) = {got}", S::NAME);
                        } else {
                            assert!(
                                (got - x.exp()).abs() <= 2e-7 * x.exp(),
                                "{} exp({x}) = {got}",
                                S::NAME
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn portable_transcendentals() {
        check_level::<Portable>();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_transcendentals() {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run() {
                check_level::<Avx2>()
            }
            unsafe { run() }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_transcendentals() {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
            #[target_feature(enable = "avx512f,avx512dq")]
            unsafe fn run() {
                check_level::<Avx512>()
            }
            unsafe { run() }
        }
    }
}
