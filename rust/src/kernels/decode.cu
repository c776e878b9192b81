// Fused kernels of the static decode step (one token; see rust/src/fused.rs). build.rs compiles
// them to PTX with nvcc; bf16 values travel as raw 16-bit words (no cuda_bf16.h) and every
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
__device__ __forceinline__ u32 bf16_bits(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ void st(bf16_t* p, long i, float x) { p[i] = (bf16_t)bf16_bits(x); }

// 16-byte vectors of T <-> floats: 4 f32 or 8 bf16 values (VEC<T>). pack rounds as st does.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };
__device__ __forceinline__ void unpack(uint4 v, float* f, const float*) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack(uint4 v, float* f, const bf16_t*) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ uint4 pack(const float* f, const float*) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
}
__device__ __forceinline__ uint4 pack(const float* f, const bf16_t*) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bf16_bits(f[2 * i]) | (bf16_bits(f[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
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

// Vector `slot` of rows j0, j0 + step, ... (UNROLL of them) of a [rows, d] block, zero past
// `len`: every load is issued before any is used.
template <typename T, int UNROLL>
__device__ __forceinline__ void load_rows(uint4* out, const T* base, int j0, int step, int len,
                                          int slot, int d) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        int j = j0 + u * step;
        out[u] = j < len ? ((const uint4*)(base + (long)j * d))[slot] : make_uint4(0, 0, 0, 0);
    }
}

// Split-K decode attention, pass 1, for the G query heads of one KV head: block (KV head
// blockIdx.x, split blockIdx.y) reads its keys and values once for all of them (the per-query-
// head kernel above read them G times). A key row is read as d / VEC 16-byte vectors by as many
// lanes, so a warp covers 32 * VEC / d keys per step and each lane keeps UNROLL loads in flight:
// the serial chain per warp is chunk / (keys per block step * UNROLL) loads long, not chunk / 4
// (scores) and chunk (values) as above. Needs d / VEC a power of two <= 32 and 16-byte aligned
// rows (the host checks). Writes the same partials as attn_partial. blockDim 128; shared
// (G * chunk + 32 + (blockDim / 32) * G * d) floats.
template <typename T, int G>
__device__ void attn_group(const T* q, const T* kbuf, const T* vbuf, const u32* inputs,
                           float* part, int d, int cap, int chunk, float scale, int n_splits) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int UNROLL = 4;
    const int L = d / VEC;
    const int KPW = 32 / L;
    int kvh = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    int sub = lane / L, slot = lane % L;
    int n = (int)inputs[2] + 1;
    int start = split * chunk;
    int len = min(chunk, n - start);
    float* lg = sh;
    float* red = lg + G * chunk;
    float* acc_sh = red + 32;
    if (len <= 0) {
        for (int hh = 0; hh < G; ++hh) {
            float* out = part + ((long)(kvh * G + hh) * n_splits + split) * (d + 2);
            for (int i = tid; i < d; i += blockDim.x) out[i] = 0.f;
            if (tid == 0) {
                out[d] = NEG_INF;
                out[d + 1] = 0.f;
            }
        }
        return;
    }
    float qr[G][VEC];
#pragma unroll
    for (int hh = 0; hh < G; ++hh)
#pragma unroll
        for (int e = 0; e < VEC; ++e)
            qr[hh][e] = ld(q, (long)(kvh * G + hh) * d + slot * VEC + e) * scale;
    const int step = nw * KPW;
    const T* K = kbuf + ((long)kvh * cap + start) * d;
    // The loop bounds are the same for every lane of a warp, so the shuffles see all 32.
    for (int b = warp * KPW; b < len; b += step * UNROLL) {
        uint4 kv[UNROLL];
        load_rows<T, UNROLL>(kv, K, b + sub, step, len, slot, d);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int j = b + sub + u * step;
            float kf[VEC];
            unpack(kv[u], kf, (const T*)0);
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; ++e) s += qr[hh][e] * kf[e];
                for (int o = L >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (slot == 0 && j < len) lg[hh * chunk + j] = s;
            }
        }
    }
    __syncthreads();
    float m_h[G], l_h[G];
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
        float* row = lg + hh * chunk;
        float m = NEG_INF;
        for (int j = tid; j < len; j += blockDim.x) m = fmaxf(m, row[j]);
        m = block_max(m, red);
        float l = 0.f;
        for (int j = tid; j < len; j += blockDim.x) {
            float p = expf(row[j] - m);
            row[j] = p;
            l += p;
        }
        // The barrier inside block_sum also publishes the probabilities.
        l_h[hh] = block_sum(l, red);
        m_h[hh] = m;
    }
    float acc[G][VEC];
#pragma unroll
    for (int hh = 0; hh < G; ++hh)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[hh][e] = 0.f;
    const T* V = vbuf + ((long)kvh * cap + start) * d;
    for (int b = warp * KPW; b < len; b += step * UNROLL) {
        uint4 vv[UNROLL];
        load_rows<T, UNROLL>(vv, V, b + sub, step, len, slot, d);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int j = b + sub + u * step;
            if (j < len) {
                float vf[VEC];
                unpack(vv[u], vf, (const T*)0);
#pragma unroll
                for (int hh = 0; hh < G; ++hh) {
                    float p = lg[hh * chunk + j];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[hh][e] += p * vf[e];
                }
            }
        }
    }
    // Sum the lanes that hold the same slot (the warp's KPW keys), then the warps.
#pragma unroll
    for (int hh = 0; hh < G; ++hh)
#pragma unroll
        for (int e = 0; e < VEC; ++e)
            for (int o = L; o < 32; o <<= 1)
                acc[hh][e] += __shfl_xor_sync(0xffffffffu, acc[hh][e], o);
    if (sub == 0) {
#pragma unroll
        for (int hh = 0; hh < G; ++hh)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc_sh[(warp * G + hh) * d + slot * VEC + e] = acc[hh][e];
    }
    __syncthreads();
    for (int idx = tid; idx < G * d; idx += blockDim.x) {
        int hh = idx / d, i = idx - hh * d;
        float s = 0.f;
        for (int w = 0; w < nw; ++w) s += acc_sh[(w * G + hh) * d + i];
        part[((long)(kvh * G + hh) * n_splits + split) * (d + 2) + i] = s;
    }
    if (tid == 0) {
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {
            float* out = part + ((long)(kvh * G + hh) * n_splits + split) * (d + 2);
            out[d] = m_h[hh];
            out[d + 1] = l_h[hh];
        }
    }
}

// Pass 2: combines the splits of query head blockIdx.x into out[h * d ..] (rows [1, nh * d]).
// Each split's weight exp(m_s - M) / L is computed once into shared memory; then the block's
// threads form blockDim / d groups, each summing every column over its share of the splits
// (several independent loads in flight), and the groups' sums are added in shared memory.
// Shared (n_splits + 32 + blockDim) floats.
template <typename T>
__device__ void attn_combine(const float* part, T* out, int d, int n_splits) {
    float* wts = sh;
    float* red = sh + n_splits;
    float* sums = red + 32;
    int h = blockIdx.x, tid = threadIdx.x;
    const float* P = part + (long)h * n_splits * (d + 2);
    float M = NEG_INF;
    for (int s = tid; s < n_splits; s += blockDim.x) M = fmaxf(M, P[(long)s * (d + 2) + d]);
    M = block_max(M, red);
    float L = 0.f;
    for (int s = tid; s < n_splits; s += blockDim.x) {
        float m = P[(long)s * (d + 2) + d];
        float w = m > NEG_INF ? expf(m - M) : 0.f;
        wts[s] = w;
        L += w * P[(long)s * (d + 2) + d + 1];
    }
    // block_sum's barrier also publishes wts.
    float inv = 1.f / block_sum(L, red);
    int groups = max(1, (int)blockDim.x / d);
    int grp = tid / d, i = tid - grp * d;
    if (grp < groups) {
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int s = grp;
        for (; s + 3 * groups < n_splits; s += 4 * groups) {
            a0 += wts[s] * P[(long)s * (d + 2) + i];
            a1 += wts[s + groups] * P[(long)(s + groups) * (d + 2) + i];
            a2 += wts[s + 2 * groups] * P[(long)(s + 2 * groups) * (d + 2) + i];
            a3 += wts[s + 3 * groups] * P[(long)(s + 3 * groups) * (d + 2) + i];
        }
        for (; s < n_splits; s += groups) a0 += wts[s] * P[(long)s * (d + 2) + i];
        sums[tid] = (a0 + a1) + (a2 + a3);
    }
    __syncthreads();
    // d > blockDim (one group): each thread covers further columns alone.
    for (int c = tid; c < d; c += blockDim.x) {
        float acc = 0.f;
        if (groups > 1 || c == tid) {
            for (int g = 0; g < groups; ++g) acc += sums[g * d + c];
        } else {
            for (int s = 0; s < n_splits; ++s) acc += wts[s] * P[(long)s * (d + 2) + c];
        }
        st(out, (long)h * d + c, acc * inv);
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

// y[1, n] = x'[1, k] W[n, k]^T (+ bias): one warp per output row (a contiguous row of W),
// 16-byte loads, x' staged in shared memory. `mode` says what x' is, so the small kernels that
// fed each product are folded into its staging (each saved a launch and a round trip):
//   GEMV_PLAIN: x' = x;
//   GEMV_SILU:  x' = silu(x[i]) * x[k + i] (SwiGLU of a gate | up row of 2k);
//   GEMV_NORM:  r = x + y (y may be null), x' = rmsnorm(r) * nw with `eps`; block 0 writes r to
//               xo (the residual stream; each block recomputes the norm of its own copy).
// Each value is rounded to T where the separate kernels stored it, so the results are theirs.
// With `yf` set, y is written there in f32 instead (the LM head's logits, unrounded and with
// no cast kernel after). Every lane loads its first GEMV_UNROLL vectors of the row before the
// staging, so the weight fetch overlaps it. Needs k % (16 / sizeof(T)) == 0 and 16-byte aligned
// rows and vectors (x, y, nw, xo). blockDim 256 (8 rows per block); shared k * sizeof(T) + 144
// bytes.
#define GEMV_PLAIN 0
#define GEMV_SILU 1
#define GEMV_NORM 2
#define GEMV_UNROLL 8
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
__device__ void gemv(const T* x, const T* __restrict__ W, const T* bias, T* y, int n, int k,
                     int mode, const T* y_in, const T* nw, T* xo, float eps, float* yf) {
    constexpr int VEC = Vec<T>::N;
    const T* t0 = nullptr;
    T* xs = (T*)sh;
    float* red = (float*)((char*)sh + ((k * (int)sizeof(T) + 15) & ~15));
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bool live = row < n;
    const uint4* wr = (const uint4*)(W + (long)(live ? row : 0) * k);
    int nv = k / VEC;
    uint4 w[GEMV_UNROLL];
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
        int c = lane + 32 * u;
        w[u] = live && c < nv ? wr[c] : make_uint4(0, 0, 0, 0);
    }
    // Staging in 16-byte vectors: a scalar loop was a chain of L2 round trips per thread (a
    // 9728-wide SwiGLU row took 38 of them).
    const uint4* xv_in = (const uint4*)x;
    uint4* xs4 = (uint4*)xs;
    if (mode == GEMV_SILU) {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float g[VEC], u[VEC];
            unpack(xv_in[i], g, t0);
            unpack(xv_in[nv + i], u, t0);
#pragma unroll
            for (int e = 0; e < VEC; ++e) g[e] = g[e] / (1.f + expf(-g[e])) * u[e];
            xs4[i] = pack(g, t0);
        }
    } else if (mode == GEMV_NORM) {
        float ss = 0.f;
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[VEC];
            unpack(xv_in[i], a, t0);
            if (y_in) {
                float b[VEC];
                unpack(((const uint4*)y_in)[i], b, t0);
#pragma unroll
                for (int e = 0; e < VEC; ++e) a[e] += b[e];
            }
            uint4 r = pack(a, t0);
            xs4[i] = r;
            if (blockIdx.x == 0 && xo) ((uint4*)xo)[i] = r;
            unpack(r, a, t0);  // the rounded residual, as the norm kernel read it back
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss += a[e] * a[e];
        }
        // Each thread rescales only the vectors it wrote, so no barrier is needed before.
        float inv = rsqrtf(block_sum(ss, red) / k + eps);
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[VEC], g[VEC];
            unpack(xs4[i], a, t0);
            unpack(((const uint4*)nw)[i], g, t0);
#pragma unroll
            for (int e = 0; e < VEC; ++e) a[e] = a[e] * inv * g[e];
            xs4[i] = pack(a, t0);
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) xs4[i] = xv_in[i];
    }
    __syncthreads();
    if (!live) return;
    const uint4* xv = (const uint4*)xs;
    float a0 = 0.f, a1 = 0.f;
    for (int base = 0;; base += 32 * GEMV_UNROLL) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u += 2) {
            int c = base + lane + 32 * u;
            if (c < nv) a0 += dot4(w[u], xv[c], t0);
            if (c + 32 < nv) a1 += dot4(w[u + 1], xv[c + 32], t0);
        }
        int next = base + 32 * GEMV_UNROLL;
        if (next >= nv) break;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            int c = next + lane + 32 * u;
            w[u] = c < nv ? wr[c] : make_uint4(0, 0, 0, 0);
        }
    }
    float acc = warp_sum(a0 + a1);
    if (lane == 0) {
        if (bias) acc += ld(bias, row);
        if (yf) {
            yf[row] = acc;
        } else {
            st(y, row, acc);
        }
    }
}

// Causal softmax of prefill logits in place, f32 math: `x` [rows, n] holds the chunk's t
// queries per row group (row r is query r % t, the GQA heads stacked as in attention.rs); query
// i sees keys 0..=n - t + i, later ones get probability 0 (and are not read). One block per
// row, three passes over it (max, sum, write); the row stays in L2 between them. Replaces the
// f32 cast, mask add, softmax and cast back that candle ops ran over [rows, n] (four full
// passes and an f32 copy of the logits). blockDim 256.
template <typename T>
__device__ void causal_softmax(T* x, int n, int t) {
    constexpr int VEC = Vec<T>::N;
    const T* t0 = nullptr;
    __shared__ float red[32];
    long r = blockIdx.x;
    int vis = n - t + (int)(r % t) + 1;
    T* row = x + r * n;
    float m = NEG_INF, l = 0.f;
    if (n % VEC == 0) {
        // 16-byte vectors (rows stay aligned when n is a multiple of VEC).
        uint4* rv = (uint4*)row;
        int nvis = (vis + VEC - 1) / VEC;
        for (int i = threadIdx.x; i < nvis; i += blockDim.x) {
            float a[VEC];
            unpack(rv[i], a, t0);
#pragma unroll
            for (int e = 0; e < VEC; ++e)
                if (i * VEC + e < vis) m = fmaxf(m, a[e]);
        }
        m = block_max(m, red);
        for (int i = threadIdx.x; i < nvis; i += blockDim.x) {
            float a[VEC];
            unpack(rv[i], a, t0);
#pragma unroll
            for (int e = 0; e < VEC; ++e)
                if (i * VEC + e < vis) l += expf(a[e] - m);
        }
        float inv = 1.f / block_sum(l, red);
        for (int i = threadIdx.x; i < n / VEC; i += blockDim.x) {
            float a[VEC] = {};
            if (i < nvis) unpack(rv[i], a, t0);
#pragma unroll
            for (int e = 0; e < VEC; ++e) a[e] = i * VEC + e < vis ? expf(a[e] - m) * inv : 0.f;
            rv[i] = pack(a, t0);
        }
        return;
    }
    for (int j = threadIdx.x; j < vis; j += blockDim.x) m = fmaxf(m, ld(row, j));
    m = block_max(m, red);
    for (int j = threadIdx.x; j < vis; j += blockDim.x) l += expf(ld(row, j) - m);
    float inv = 1.f / block_sum(l, red);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        st(row, j, j < vis ? expf(ld(row, j) - m) * inv : 0.f);
}

// Index of the largest of x[0..n) into out[0]: the first on ties, NaN never wins (all NaN: 0),
// as the host's argmax. One block of 1024 threads, 16-byte loads (x 16-byte aligned); greedy
// decoding reads these 4 bytes instead of the logits.
extern "C" __global__ void argmax_f32(const float* x, int n, u32* out) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    float best = NEG_INF;
    int idx = 0x7fffffff;
    const float4* x4 = (const float4*)x;
    int n4 = n / 4;
    // Each thread sees its indices in increasing order, so a strict > keeps the first.
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = x4[i];
        if (v.x > best) best = v.x, idx = 4 * i;
        if (v.y > best) best = v.y, idx = 4 * i + 1;
        if (v.z > best) best = v.z, idx = 4 * i + 2;
        if (v.w > best) best = v.w, idx = 4 * i + 3;
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x)
        if (x[i] > best) best = x[i], idx = i;
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ob > best || (ob == best && oi < idx)) best = ob, idx = oi;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) bv[warp] = best, bi[warp] = idx;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? bv[lane] : NEG_INF;
        idx = lane < nw ? bi[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ob > best || (ob == best && oi < idx)) best = ob, idx = oi;
        }
        if (lane == 0) out[0] = idx == 0x7fffffff ? 0u : (u32)idx;
    }
}

#define ATTN_GROUP_ARGS(T)                                                                   \
    const T *q, const T *kbuf, const T *vbuf, const u32 *inputs, float *part, int d, int cap, \
        int chunk, float scale, int n_splits

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
    extern "C" __global__ void attn_group1_##S(ATTN_GROUP_ARGS(T)) {                     \
        attn_group<T, 1>(q, kbuf, vbuf, inputs, part, d, cap, chunk, scale, n_splits);       \
    }                                                                                        \
    extern "C" __global__ void attn_group2_##S(ATTN_GROUP_ARGS(T)) {                     \
        attn_group<T, 2>(q, kbuf, vbuf, inputs, part, d, cap, chunk, scale, n_splits);       \
    }                                                                                        \
    extern "C" __global__ void attn_group4_##S(ATTN_GROUP_ARGS(T)) {                     \
        attn_group<T, 4>(q, kbuf, vbuf, inputs, part, d, cap, chunk, scale, n_splits);       \
    }                                                                                        \
    extern "C" __global__ void attn_group8_##S(ATTN_GROUP_ARGS(T)) {                     \
        attn_group<T, 8>(q, kbuf, vbuf, inputs, part, d, cap, chunk, scale, n_splits);       \
    }                                                                                        \
    extern "C" __global__ void attn_combine_##S(const float* part, T* out, int d,            \
                                                int n_splits) {                              \
        attn_combine<T>(part, out, d, n_splits);                                             \
    }                                                                                        \
    extern "C" __global__ void silu_mul_##S(const T* gu, T* out, int f) {                    \
        silu_mul<T>(gu, out, f);                                                             \
    }                                                                                        \
    extern "C" __global__ void gemv_##S(const T* x, const T* W, const T* bias, T* y, int n,  \
                                        int k, int mode, const T* y_in, const T* nw, T* xo,  \
                                        float eps, float* yf) {                              \
        gemv<T>(x, W, bias, y, n, k, mode, y_in, nw, xo, eps, yf);                           \
    }                                                                                        \
    extern "C" __global__ void causal_softmax_##S(T* x, int n, int t) {                      \
        causal_softmax<T>(x, n, t);                                                          \
    }                                                                                        \
    extern "C" __global__ void add_rms_norm_##S(const T* x, const T* y, const T* w, T* xo,   \
                                                T* ho, int n, float eps) {                   \
        add_rms_norm<T>(x, y, w, xo, ho, n, eps);                                            \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
