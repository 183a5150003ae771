// The node's own CUDA kernels, compiled by NVRTC at start (model::cuda).
// Each has a CPU twin in Rust that the tests compare against the host path;
// see the Rust op that launches it for what it computes and why it exists.

// KV pool store (model::paged::write::StoreKv): the keys and values of a
// step's rows go to their pool slots, one thread per element.
// pool: [2, kv_heads, positions, hd] (keys, then values); qkv: [rows, width].
extern "C" __global__ void kv_store(float *pool, const float *qkv, const unsigned int *slots,
                                    unsigned int q_width, unsigned int kvd, unsigned int width,
                                    unsigned int hd, unsigned int positions, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int row = i / (2 * kvd), e = i % (2 * kvd);
    unsigned int head = e / hd;  // keys' heads, then values' (the pool's order)
    pool[((size_t)head * positions + slots[row]) * hd + e % hd] = qkv[(size_t)row * width + q_width + e];
}

// RoPE of queries and keys in place (model::paged::rope::RopeRows): row t
// rotates at its own position (cos/sin: [rows, hd / 2]); the first q_heads
// heads are queries, whose tables carry attention's scale.
extern "C" __global__ void rope_rows(float *qkv, const float *cos, const float *sin,
                                     unsigned int width, unsigned int heads, unsigned int q_heads,
                                     unsigned int hd, float q_scale, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int pairs = hd / 2;
    unsigned int t = i / (heads * pairs), h = (i / pairs) % heads, p = i % pairs;
    float c = cos[t * pairs + p], s = sin[t * pairs + p];
    if (h < q_heads) {
        c *= q_scale;
        s *= q_scale;
    }
    float *x = qkv + (size_t)t * width + h * hd + 2 * p;
    float x0 = x[0], x1 = x[1];
    x[0] = x0 * c - x1 * s;
    x[1] = x0 * s + x1 * c;
}

// Attention of decoding rows over the pool (model::paged::decode): one
// block of 4 warps per (query head, row). A key is read by hd / 8 lanes, 8
// dimensions each, so a warp takes 32 / (hd / 8) keys at a time (4 for
// hd = 64); every such lane group keeps a running softmax over its keys,
// and the groups merge at the end. table: a header [step row, keys, first
// block] per row, then the rows' blocks. hd is a power of two, 8 to 256.
#define DECODE_WARPS 4
#define DIMS_PER_LANE 8
extern "C" __global__ void decode_attend(float *out, const float *qkv, const float *pool,
                                         const unsigned int *table, unsigned int width,
                                         unsigned int n_head, unsigned int kv_heads, unsigned int hd,
                                         unsigned int positions, unsigned int block_tokens) {
    // Per lane group: its running max and sum, and its share of the output.
    __shared__ float group_max[DECODE_WARPS * 32], group_sum[DECODE_WARPS * 32];
    __shared__ float group_acc[DECODE_WARPS * 32 * DIMS_PER_LANE];
    unsigned int head = blockIdx.x, r = blockIdx.y;
    unsigned int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned int per_key = hd / DIMS_PER_LANE, keys_per_warp = 32 / per_key;
    unsigned int sub = lane / per_key, part = lane % per_key, group = warp * keys_per_warp + sub;
    const unsigned int *t = table + 3 * (size_t)r;
    unsigned int len = t[1];
    const unsigned int *blocks = table + 3 * (size_t)gridDim.y + t[2];
    unsigned int g = head / (n_head / kv_heads);
    const float *q = qkv + (size_t)t[0] * width + head * hd + part * DIMS_PER_LANE;
    const float *keys = pool + (size_t)g * positions * hd + part * DIMS_PER_LANE;
    const float *values = pool + ((size_t)kv_heads + g) * positions * hd + part * DIMS_PER_LANE;
    float qv[DIMS_PER_LANE], acc[DIMS_PER_LANE];
    for (int i = 0; i < DIMS_PER_LANE; ++i) {
        qv[i] = q[i];
        acc[i] = 0.0f;
    }
    float m = __int_as_float(0xff800000), l = 0.0f;
    for (unsigned int j0 = warp * keys_per_warp; j0 < len; j0 += DECODE_WARPS * keys_per_warp) {
        unsigned int j = j0 + sub;
        bool valid = j < len;
        size_t slot = valid ? (size_t)blocks[j / block_tokens] * block_tokens + j % block_tokens : 0;
        float s = 0.0f;
        if (valid)
            for (int i = 0; i < DIMS_PER_LANE; ++i) s += qv[i] * keys[slot * hd + i];
        // Sum over the key's lanes: a group is per_key aligned lanes.
        for (unsigned int off = per_key / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (valid) {
            float m2 = fmaxf(m, s);
            float shrink = expf(m - m2), p = expf(s - m2);
            for (int i = 0; i < DIMS_PER_LANE; ++i) acc[i] = acc[i] * shrink + p * values[slot * hd + i];
            l = l * shrink + p;
            m = m2;
        }
    }
    if (part == 0) {
        group_max[group] = m;
        group_sum[group] = l;
    }
    for (int i = 0; i < DIMS_PER_LANE; ++i) group_acc[group * hd + part * DIMS_PER_LANE + i] = acc[i];
    __syncthreads();
    unsigned int groups = DECODE_WARPS * keys_per_warp;
    float *o = out + (size_t)r * n_head * hd + head * hd;
    for (unsigned int d = threadIdx.x; d < hd; d += blockDim.x) {
        float top = __int_as_float(0xff800000);
        for (unsigned int k = 0; k < groups; ++k)
            if (group_sum[k] > 0.0f) top = fmaxf(top, group_max[k]);
        float sum = 0.0f, val = 0.0f;
        for (unsigned int k = 0; k < groups; ++k) {
            if (group_sum[k] > 0.0f) {
                float f = expf(group_max[k] - top);
                sum += group_sum[k] * f;
                val += group_acc[k * hd + d] * f;
            }
        }
        o[d] = sum > 0.0f ? val / sum : 0.0f;
    }
}

// Residual add and RMS norm in one pass (model::fused::AddRmsNorm): one
// block per row; out[0] = x + y, out[1] = rms_norm(x + y) * w.
extern "C" __global__ void add_rms_norm(float *out, const float *x, const float *y, const float *w,
                                        unsigned int cols, float eps, unsigned int rows) {
    __shared__ float partial[32];
    unsigned int row = blockIdx.x;
    const float *xr = x + (size_t)row * cols, *yr = y + (size_t)row * cols;
    float *sum_row = out + (size_t)row * cols, *norm_row = out + ((size_t)rows + row) * cols;
    float sq = 0.0f;
    for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x) {
        float z = xr[c] + yr[c];
        sum_row[c] = z;
        sq += z * z;
    }
    for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sq;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    float scale = rsqrtf(partial[0] / cols + eps);
    for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x) norm_row[c] = sum_row[c] * scale * w[c];
}

// SwiGLU's product (model::fused::SiluMul): out[r, c] = silu(gate) * up,
// with gate and up side by side in a row of gu ([rows, 2 * f]).
extern "C" __global__ void silu_mul(float *out, const float *gu, unsigned int f, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int r = i / f, c = i % f;
    float g = gu[(size_t)r * 2 * f + c], u = gu[(size_t)r * 2 * f + f + c];
    out[i] = g / (1.0f + expf(-g)) * u;
}
