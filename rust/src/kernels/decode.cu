// Fused kernels of the static decode step (one token; see rust/src/fused.rs). Compiled at run
// time with NVRTC, so no CUDA headers: bf16 values travel as raw 16-bit words and every
// kernel computes in f32. Each kernel exists for f32 and bf16 (`_f32`, `_bf16`).

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define NEG_INF __int_as_float(0xff800000)

// Dynamic shared memory of every kernel that takes some.
extern __shared__ __align__(16) float sh[];

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) {
    return __uint_as_float(((u32)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float x) { p[i] = x; }
// Round to nearest even, as a cast to bf16 does.
__device__ __forceinline__ void st(bf16_t* p, long i, float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16_t)0x7fc0;
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum / max over the block, returned to every thread. blockDim.x is a multiple of 32; `red`
// holds 32 floats. Every thread of the block must call it.
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_sum(lane < nw ? red[lane] : 0.f);
}
__device__ float block_max(float v, float* red) {
    v = warp_max(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_max(lane < nw ? red[lane] : NEG_INF);
}

// One token's q|k|v row -> per-head RMSNorm (optional) and RoPE of q and k; q to `q_out`
// [nh, d], k and v into the packed cache buffers [nkv, cap, d] at row inputs[2], with the
// RoPE row inputs[1] of the [rows, d/2] tables. Grid nh + 2 nkv blocks (q heads, k heads,
// v heads), blockDim = d rounded up to 32; shared (d + 32) floats.
template <typename T>
__device__ void qkv_rope_store(const T* qkv, const T* qn, const T* kn, int has_norm,
                               const T* cos_t, const T* sin_t, const u32* inputs, T* q_out,
                               T* kbuf, T* vbuf, int nh, int nkv, int d, int cap, float eps,
                               int interleaved) {
    float* x = sh;
    float* red = sh + d;
    int b = blockIdx.x, i = threadIdx.x;
    long row = inputs[1], w = inputs[2];
    float v = i < d ? ld(qkv, (long)b * d + i) : 0.f;
    if (b >= nh + nkv) {
        if (i < d) st(vbuf, ((long)(b - nh - nkv) * cap + w) * d + i, v);
        return;
    }
    bool is_q = b < nh;
    if (has_norm) {
        float inv = rsqrtf(block_sum(v * v, red) / d + eps);
        v = i < d ? v * inv * ld(is_q ? qn : kn, i) : 0.f;
    }
    if (i < d) x[i] = v;
    __syncthreads();
    if (i >= d) return;
    int half = d / 2;
    const T* c = cos_t + row * half;
    const T* s = sin_t + row * half;
    float out;
    if (interleaved) {
        int p = i >> 1;
        out = (i & 1) ? x[i - 1] * ld(s, p) + x[i] * ld(c, p) : x[i] * ld(c, p) - x[i + 1] * ld(s, p);
    } else if (i < half) {
        out = x[i] * ld(c, i) - x[i + half] * ld(s, i);
    } else {
        out = x[i] * ld(c, i - half) + x[i - half] * ld(s, i - half);
    }
    if (is_q) {
        st(q_out, (long)b * d + i, out);
    } else {
        st(kbuf, ((long)(b - nh) * cap + w) * d + i, out);
    }
}

// Split-K decode attention, pass 1: query head blockIdx.x over keys
// [blockIdx.y * chunk, ...) of its KV head, cut at row inputs[2] (the newest key). Writes the
// chunk's unnormalised output, max logit and exp-sum to part[h, split, 0..d+2].
// blockDim 128; shared (d + chunk + 32) floats.
template <typename T>
__device__ void attn_partial(const T* q, const T* kbuf, const T* vbuf, const u32* inputs,
                             float* part, int g, int d, int cap, int chunk, float scale,
                             int n_splits) {
    float* qs = sh;
    float* lg = sh + d;
    float* red = lg + chunk;
    int h = blockIdx.x, split = blockIdx.y, tid = threadIdx.x, kvh = h / g;
    int n = (int)inputs[2] + 1;
    int start = split * chunk;
    int len = min(chunk, n - start);
    float* out = part + ((long)h * n_splits + split) * (d + 2);
    if (len <= 0) {
        for (int i = tid; i < d; i += blockDim.x) out[i] = 0.f;
        if (tid == 0) {
            out[d] = NEG_INF;
            out[d + 1] = 0.f;
        }
        return;
    }
    for (int i = tid; i < d; i += blockDim.x) qs[i] = ld(q, (long)h * d + i) * scale;
    __syncthreads();
    const T* K = kbuf + ((long)kvh * cap + start) * d;
    int lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    for (int j = warp; j < len; j += nw) {
        float acc = 0.f;
        for (int i = lane; i < d; i += 32) acc += qs[i] * ld(K, (long)j * d + i);
        acc = warp_sum(acc);
        if (lane == 0) lg[j] = acc;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int j = tid; j < len; j += blockDim.x) m = fmaxf(m, lg[j]);
    m = block_max(m, red);
    float l = 0.f;
    for (int j = tid; j < len; j += blockDim.x) {
        float p = expf(lg[j] - m);
        lg[j] = p;
        l += p;
    }
    l = block_sum(l, red);
    const T* V = vbuf + ((long)kvh * cap + start) * d;
    for (int i = tid; i < d; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < len; ++j) acc += lg[j] * ld(V, (long)j * d + i);
        out[i] = acc;
    }
    if (tid == 0) {
        out[d] = m;
        out[d + 1] = l;
    }
}

// Pass 2: combines the splits of query head blockIdx.x into out[h * d ..] (rows [1, nh * d]).
template <typename T>
__device__ void attn_combine(const float* part, T* out, int d, int n_splits) {
    int h = blockIdx.x;
    const float* P = part + (long)h * n_splits * (d + 2);
    float M = NEG_INF;
    for (int s = 0; s < n_splits; ++s) M = fmaxf(M, P[(long)s * (d + 2) + d]);
    float L = 0.f;
    for (int s = 0; s < n_splits; ++s) {
        float m = P[(long)s * (d + 2) + d];
        if (m > NEG_INF) L += P[(long)s * (d + 2) + d + 1] * expf(m - M);
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < n_splits; ++s) {
            float m = P[(long)s * (d + 2) + d];
            if (m > NEG_INF) acc += P[(long)s * (d + 2) + i] * expf(m - M);
        }
        st(out, (long)h * d + i, acc / L);
    }
}

// SwiGLU of one row: out[i] = silu(gu[i]) * gu[f + i].
template <typename T>
__device__ void silu_mul(const T* gu, T* out, int f) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < f; i += gridDim.x * blockDim.x) {
        float g = ld(gu, i);
        st(out, i, g / (1.f + expf(-g)) * ld(gu, (long)f + i));
    }
}

// Residual add then RMSNorm of one row: xo = x + y (rounded to T, the residual stream's
// dtype), ho = rmsnorm(xo) * w. One block; shared 32 floats.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* y, const T* w, T* xo, T* ho, int n, float eps) {
    __shared__ float red[32];
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        st(xo, i, ld(x, i) + ld(y, i));
        float r = ld(xo, i);
        ss += r * r;
    }
    float inv = rsqrtf(block_sum(ss, red) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) st(ho, i, ld(xo, i) * inv * ld(w, i));
}

// y[1, n] = x[1, k] W[n, k]^T (+ bias): one warp per output row (a contiguous row of W), 16-byte
// loads, x staged in shared memory. Needs k % (16 / sizeof(T)) == 0 and 16-byte aligned rows.
// blockDim 256 (8 rows per block); shared k * sizeof(T) bytes.
__device__ __forceinline__ float dot4(uint4 a, uint4 b, const float*) {
    return __uint_as_float(a.x) * __uint_as_float(b.x) + __uint_as_float(a.y) * __uint_as_float(b.y)
         + __uint_as_float(a.z) * __uint_as_float(b.z) + __uint_as_float(a.w) * __uint_as_float(b.w);
}
__device__ __forceinline__ float dot2(u32 a, u32 b) {
    return __uint_as_float(a << 16) * __uint_as_float(b << 16)
         + __uint_as_float(a & 0xffff0000u) * __uint_as_float(b & 0xffff0000u);
}
__device__ __forceinline__ float dot4(uint4 a, uint4 b, const bf16_t*) {
    return dot2(a.x, b.x) + dot2(a.y, b.y) + dot2(a.z, b.z) + dot2(a.w, b.w);
}

template <typename T>
__device__ void gemv(const T* x, const T* W, const T* bias, T* y, int n, int k) {
    T* xs = (T*)sh;
    for (int i = threadIdx.x; i < k; i += blockDim.x) xs[i] = x[i];
    __syncthreads();
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4* wr = (const uint4*)(W + (long)row * k);
    const uint4* xv = (const uint4*)xs;
    int nv = k / (int)(16 / sizeof(T));
    float a0 = 0.f, a1 = 0.f;
    int c = lane;
    for (; c + 32 < nv; c += 64) {
        uint4 w0 = wr[c], w1 = wr[c + 32];
        a0 += dot4(w0, xv[c], (const T*)0);
        a1 += dot4(w1, xv[c + 32], (const T*)0);
    }
    if (c < nv) a0 += dot4(wr[c], xv[c], (const T*)0);
    float acc = warp_sum(a0 + a1);
    if (lane == 0) {
        if (bias) acc += ld(bias, row);
        st(y, row, acc);
    }
}

#define INSTANTIATE(T, S)                                                                    \
    extern "C" __global__ void qkv_rope_store_##S(                                           \
        const T* qkv, const T* qn, const T* kn, int has_norm, const T* cos_t, const T* sin_t, \
        const u32* inputs, T* q_out, T* kbuf, T* vbuf, int nh, int nkv, int d, int cap,      \
        float eps, int interleaved) {                                                        \
        qkv_rope_store<T>(qkv, qn, kn, has_norm, cos_t, sin_t, inputs, q_out, kbuf, vbuf, nh, \
                          nkv, d, cap, eps, interleaved);                                    \
    }                                                                                        \
    extern "C" __global__ void attn_partial_##S(const T* q, const T* kbuf, const T* vbuf,    \
                                                const u32* inputs, float* part, int g, int d, \
                                                int cap, int chunk, float scale,             \
                                                int n_splits) {                              \
        attn_partial<T>(q, kbuf, vbuf, inputs, part, g, d, cap, chunk, scale, n_splits);     \
    }                                                                                        \
    extern "C" __global__ void attn_combine_##S(const float* part, T* out, int d,            \
                                                int n_splits) {                              \
        attn_combine<T>(part, out, d, n_splits);                                             \
    }                                                                                        \
    extern "C" __global__ void silu_mul_##S(const T* gu, T* out, int f) {                    \
        silu_mul<T>(gu, out, f);                                                             \
    }                                                                                        \
    extern "C" __global__ void gemv_##S(const T* x, const T* W, const T* bias, T* y, int n,  \
                                        int k) {                                             \
        gemv<T>(x, W, bias, y, n, k);                                                        \
    }                                                                                        \
    extern "C" __global__ void add_rms_norm_##S(const T* x, const T* y, const T* w, T* xo,   \
                                                T* ho, int n, float eps) {                   \
        add_rms_norm<T>(x, y, w, xo, ho, n, eps);                                            \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
