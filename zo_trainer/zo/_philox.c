/* Philox4x32-10 directions on CPU: target = source + sum_k scale_k * z_k, z drawn tile by tile.
 *
 * The numbers are defined in philox.py, whose torch implementation computes them bit for bit (it is
 * the fallback where this file cannot be built, and the tests' reference). Bit-exact on any x86 vector
 * width because only exact integer ops and IEEE float +, *, sqrt are used, each rounded on its own:
 * built with -ffp-contract=off, so no fused multiply-add changes a rounding.
 *
 * Built by pip install (pyproject.toml) with -fopenmp. Where torch runs on libgomp.so.1 (Linux pip wheels)
 * that library is already loaded, so the parallel loop runs on torch's own OpenMP team and never
 * competes with torch's spinning worker threads; elsewhere a second OpenMP runtime serves it.
 * Called through ctypes (no Python headers needed).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#ifdef __FAST_MATH__
#error "fast-math reorders float operations: the kernel would no longer match philox.py bit for bit"
#endif

#define ZO_PHILOX_ABI 3  /* bump with any change of the exported functions' contract; philox.py checks it */

#define TILE_BLOCKS 64                 /* Philox blocks per Gaussian tile */
#define TILE (4 * TILE_BLOCKS)         /* entries per tile: 256 (Rademacher: 2 blocks of 128 bits) */

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Philox4x32-10 of counters (first + l, 0, 0) for l < count, key = seed: lane l's 4 words in x[.][l]. */
static void philox_portable(uint64_t seed, uint64_t first, int count, uint32_t x[4][TILE_BLOCKS]) {
    for (int l = 0; l < count; l++) {
        uint64_t counter = first + (uint64_t)l;
        x[0][l] = (uint32_t)counter; x[1][l] = (uint32_t)(counter >> 32); x[2][l] = 0; x[3][l] = 0;
    }
    uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; round++) {
        for (int l = 0; l < count; l++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * x[0][l], p1 = (uint64_t)PHILOX_M1 * x[2][l];
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x[1][l] ^ key0;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x[3][l] ^ key1;
            x[1][l] = (uint32_t)p1; x[3][l] = (uint32_t)p0; x[0][l] = y0; x[2][l] = y2;
        }
        key0 += PHILOX_W0; key1 += PHILOX_W1;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* The same blocks, 64 at a time in AVX-512 registers (count is a multiple of 64). Each 64-bit
 * lane holds one block's word in its low half, so one unsigned 32x32 -> 64 multiply gives both halves
 * of a product, and the upper halves are never read (the multiplies ignore them, the stores drop them).
 * Eight independent groups of 8 blocks are interleaved to hide the multiplies' latency. */
#define AVX512_GROUPS 8
__attribute__((target("avx512f")))
static void philox_avx512(uint64_t seed, uint64_t first, int count, uint32_t x[4][TILE_BLOCKS]) {
    const __m512i m0 = _mm512_set1_epi64(PHILOX_M0), m1 = _mm512_set1_epi64(PHILOX_M1);
    const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    for (int g = 0; g < count; g += 8 * AVX512_GROUPS) {
        __m512i x0[AVX512_GROUPS], x1[AVX512_GROUPS], x2[AVX512_GROUPS], x3[AVX512_GROUPS];
        for (int j = 0; j < AVX512_GROUPS; j++) {
            __m512i counter = _mm512_add_epi64(_mm512_set1_epi64((long long)(first + (uint64_t)(g + 8 * j))), lanes);
            x0[j] = counter; x1[j] = _mm512_srli_epi64(counter, 32); x2[j] = x3[j] = _mm512_setzero_si512();
        }
        uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
        for (int round = 0; round < 10; round++) {
            const __m512i k0 = _mm512_set1_epi64(key0), k1 = _mm512_set1_epi64(key1);
            for (int j = 0; j < AVX512_GROUPS; j++) {
                __m512i p0 = _mm512_mul_epu32(x0[j], m0), p1 = _mm512_mul_epu32(x2[j], m1);
                __m512i y0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x1[j], k0, 0x96);  /* a ^ b ^ c */
                __m512i y2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3[j], k1, 0x96);
                x1[j] = p1; x3[j] = p0; x0[j] = y0; x2[j] = y2;
            }
            key0 += PHILOX_W0; key1 += PHILOX_W1;
        }
        for (int j = 0; j < AVX512_GROUPS; j++) {
            int l = g + 8 * j;
            _mm256_storeu_si256((__m256i *)&x[0][l], _mm512_cvtepi64_epi32(x0[j]));
            _mm256_storeu_si256((__m256i *)&x[1][l], _mm512_cvtepi64_epi32(x1[j]));
            _mm256_storeu_si256((__m256i *)&x[2][l], _mm512_cvtepi64_epi32(x2[j]));
            _mm256_storeu_si256((__m256i *)&x[3][l], _mm512_cvtepi64_epi32(x3[j]));
        }
    }
}
/* The same blocks, 8 at a time in AVX2 registers (count and first are multiples of 8). */
__attribute__((target("avx2")))
static void philox_avx2(uint64_t seed, uint64_t first, int count, uint32_t x[4][TILE_BLOCKS]) {
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int g = 0; g < count; g += 8) {
        uint64_t base = first + (uint64_t)g;
        __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)base), lanes);
        __m256i x1 = _mm256_set1_epi32((int)(uint32_t)(base >> 32)), x2 = _mm256_setzero_si256(), x3 = x2;
        uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
        for (int round = 0; round < 10; round++) {
            __m256i e0 = _mm256_mul_epu32(x0, m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(x0, 32), m0);
            __m256i e1 = _mm256_mul_epu32(x2, m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(x2, 32), m1);
            __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
            __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
            __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
            __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
            x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32((int)key0));
            x1 = lo1;
            x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32((int)key1));
            x3 = lo0;
            key0 += PHILOX_W0; key1 += PHILOX_W1;
        }
        _mm256_storeu_si256((__m256i *)&x[0][g], x0); _mm256_storeu_si256((__m256i *)&x[1][g], x1);
        _mm256_storeu_si256((__m256i *)&x[2][g], x2); _mm256_storeu_si256((__m256i *)&x[3][g], x3);
    }
}
#endif

/* Philox blocks through one implementation (0 portable, 1 AVX2, 2 AVX-512) into out[4][64], for the
 * tests: count <= 64 is a multiple of 8 (of 64 for AVX-512), and so is first for AVX2. Returns 0
 * where the CPU lacks the instructions. */
int32_t zo_philox_blocks(uint64_t seed, uint64_t first, int32_t count, int32_t isa, uint32_t *out) {
    uint32_t (*x)[TILE_BLOCKS] = (uint32_t (*)[TILE_BLOCKS])out;
    if (isa == 0) { philox_portable(seed, first, count, x); return 1; }
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == 1 && __builtin_cpu_supports("avx2")) { philox_avx2(seed, first, count, x); return 1; }
    if (isa == 2 && __builtin_cpu_supports("avx512f")) { philox_avx512(seed, first, count, x); return 1; }
#endif
    return 0;
}

static inline void philox(uint64_t seed, uint64_t first, int count, uint32_t x[4][TILE_BLOCKS]) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (count % 64 == 0 && __builtin_cpu_supports("avx512f")) { philox_avx512(seed, first, count, x); return; }
    if (count % 8 == 0 && __builtin_cpu_supports("avx2")) { philox_avx2(seed, first, count, x); return; }
#endif
    philox_portable(seed, first, count, x);
}

/* ln(u) for u in (0, 1): Cephes' logf, branch-free. Constants are the float32 values of philox.py. */
static inline float log_f(float u) {
    uint32_t bits = as_uint(u);
    int32_t e = (int32_t)((bits >> 23) & 0xff) - 126;
    uint32_t mantissa = (bits & 0x007fffffu) | 0x3f000000u;    /* in [0.5, 1) */
    int32_t small = (int32_t)(mantissa < 0x3f3504f3u);         /* below sqrt(1/2): use 2m, e - 1 */
    e -= small;
    float m = as_float(mantissa + ((uint32_t)small << 23)) - 1.0f;
    float z = m * m;
    float y = 0x1.204376p-4f;
    y = y * m + -0x1.d7a37p-4f;
    y = y * m + 0x1.de4a34p-4f;
    y = y * m + -0x1.fcba9ep-4f;
    y = y * m + 0x1.23d37ep-3f;
    y = y * m + -0x1.555cap-3f;
    y = y * m + 0x1.999d58p-3f;
    y = y * m + -0x1.fffff8p-3f;
    y = y * m + 0x1.555554p-2f;
    y = y * m * z;
    float fe = (float)e;
    y = y + -0x1.bd0106p-13f * fe;
    y = y + -0.5f * z;
    z = m + y;
    return z + 0x1.63p-1f * fe;
}

/* Box-Muller of the word pairs (a, t): out_cos = r cos(theta), out_sin = r sin(theta). */
static inline void box_muller(const uint32_t *restrict a, const uint32_t *restrict t,
                              float *restrict out_cos, float *restrict out_sin) {
    for (int l = 0; l < TILE_BLOCKS; l++) {
        float u = (float)(int32_t)(((a[l] >> 9) << 1) | 1u) * 0x1p-24f;          /* (2k+1)/2^24 in (0, 1) */
        float r = sqrtf(-2.0f * log_f(u));
        uint32_t quadrant = t[l] >> 30;
        float s = (float)((int32_t)((((t[l] & 0x3fffffffu) >> 6) << 1) | 1u) - (1 << 24)) * 0x1p-25f;
        float angle = s * 0x1.921fb6p+0f;                                       /* in (-pi/4, pi/4) */
        float zz = angle * angle;
        float sine = ((-0x1.9943f2p-13f * zz + 0x1.11073cp-7f) * zz + -0x1.555546p-3f) * zz * angle + angle;
        float cosine = ((0x1.99eb9cp-16f * zz + -0x1.6c0c34p-10f) * zz + 0x1.55554ap-5f) * zz * zz - 0.5f * zz + 1.0f;
        uint32_t odd = 0u - (quadrant & 1u), negate = (quadrant & 2u) << 30;     /* rotate by quadrant/4 turns */
        uint32_t c = (as_uint(cosine) & ~odd) | ((as_uint(sine) ^ 0x80000000u) & odd);
        uint32_t s_ = (as_uint(sine) & ~odd) | (as_uint(cosine) & odd);
        out_cos[l] = r * as_float(c ^ negate);
        out_sin[l] = r * as_float(s_ ^ negate);
    }
}

/* The Gaussian entries [start, start + TILE) of one direction in block order: z[j][l] is entry start + 4l + j
 * (entry 4b + 2p + j comes from words 2p (radius) and 2p + 1 (angle) of block b); start is a multiple of TILE. */
static inline __attribute__((always_inline)) void gaussian_tile(uint64_t seed, int64_t start, float z[4][TILE_BLOCKS]) {
    uint32_t x[4][TILE_BLOCKS];
    philox(seed, (uint64_t)start / 4, TILE_BLOCKS, x);
    box_muller(x[0], x[1], z[0], z[1]);
    box_muller(x[2], x[3], z[2], z[3]);
}

/* Entries [start, start + TILE) of one direction, in entry order; start is a multiple of TILE. */
static inline __attribute__((always_inline)) void draw_tile(uint64_t seed, int64_t start, int rademacher, float *restrict w) {
    if (rademacher) {  /* entry e: bit e % 32 of word (e / 32) % 4 of block e / 128 */
        uint32_t x[4][TILE_BLOCKS];
        philox(seed, (uint64_t)start / 128, 2, x);
        for (int j = 0; j < TILE / 32; j++) {
            uint32_t word = x[j & 3][j >> 2];
            for (int b = 0; b < 32; b++) w[32 * j + b] = (float)(int32_t)(((word >> b) & 1u) << 1) - 1.0f;
        }
        return;
    }
    float z[4][TILE_BLOCKS];
    gaussian_tile(seed, start, z);
    for (int l = 0; l < TILE_BLOCKS; l++)
        for (int j = 0; j < 4; j++) w[4 * l + j] = z[j][l];
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
/* Tile `tile` of the directions (entries [tile * TILE, (tile + 1) * TILE)), drawn once, added where it
 * overlaps the slice [first, first + n): target[i - first] = source[i - first] + sum_k scales[k] * z_k[i].
 * A slice that starts inside a tile (a row of a matrix) shares its first and last tiles with its neighbours. */
static void add_tile(const float *source, float *target, int64_t first, int64_t n, int64_t tile,
                     int32_t chain, const uint64_t *seeds, const float *scales, const uint8_t *used,
                     float alpha, float beta, int32_t rademacher) {
    float acc[TILE], z[TILE], w[TILE];
    int64_t begin = tile * TILE, offset = begin - first;  /* entry begin + i is source[offset + i] */
    int64_t lo = offset < 0 ? -offset : 0, hi = n - offset < TILE ? n - offset : TILE;
    int whole = lo == 0 && hi == TILE;  /* fixed bounds: the loops over a whole tile are vectorised without tails */
    if (whole && chain == 1 && used[0] && !rademacher) {
        /* a probe's copies, a one-query update: each Gaussian entry is added as Box-Muller leaves it, with no
         * accumulator and no reordering through memory (bench_directions.py: 1.21 -> 1.11 ns per entry on one
         * thread). Not for ±1 entries: done the same way out of place, they took 0.36-0.38 ns per entry on 2 threads
         * instead of 0.23-0.27 (bench_directions.py). */
        float g[4][TILE_BLOCKS];
        const float *s = source + offset;
        float *t = target + offset;  /* may be s: each entry is read before it is written */
        gaussian_tile(seeds[0], begin, g);
        #pragma GCC ivdep
        for (int l = 0; l < TILE_BLOCKS; l++)
            for (int j = 0; j < 4; j++) t[4 * l + j] = s[4 * l + j] + scales[0] * g[j][l];
        return;
    }
    if (whole)
        for (int i = 0; i < TILE; i++) acc[i] = source[offset + i];
    else {
        for (int i = 0; i < TILE; i++) acc[i] = 0.0f;  /* entries outside the slice are computed, never stored */
        for (int64_t i = lo; i < hi; i++) acc[i] = source[offset + i];
    }
    for (int32_t k = 0; k < chain; k++) {
        draw_tile(seeds[k], begin, rademacher, w);
        const float *z_k = w;
        if (alpha != 0.0f && chain > 1) {  /* Algorithm 1's chain: z_k = alpha z_{k-1} + beta w_k */
            if (k == 0)
                memcpy(z, w, sizeof z);
            else
                for (int i = 0; i < TILE; i++) z[i] = alpha * z[i] + beta * w[i];
            z_k = z;
        }
        if (used[k])
            for (int i = 0; i < TILE; i++) acc[i] = acc[i] + scales[k] * z_k[i];
    }
    if (whole)
        for (int i = 0; i < TILE; i++) target[offset + i] = acc[i];
    else
        for (int64_t i = lo; i < hi; i++) target[offset + i] = acc[i];
}

/* For each tensor t < count: targets[t][i] = sources[t][i] + sum_{k < chain, used[k]} scales[t][k] * z_tk[firsts[t] + i]
 * for i < sizes[t] (float32), z_tk drawn with seeds[t * chain + k] and scales[t][k] = scales[t * chain + k].
 * firsts[t] is any entry; targets[t] may equal sources[t]. One parallel region for the whole list: the tiles
 * of each tensor are shared among the threads, which go on to the next tensor without waiting, so many
 * small tensors cost one fork and join, not one each. */
void zo_add_directions(int32_t count, const float *const *sources, float *const *targets, const int64_t *firsts,
                       const int64_t *sizes, int32_t chain, const uint64_t *seeds, const float *scales,
                       const uint8_t *used, float alpha, float beta, int32_t rademacher, int32_t threads) {
    int64_t total = 0;
    for (int32_t t = 0; t < count; t++) total += sizes[t];
    #pragma omp parallel num_threads(threads) if (threads > 1 && total >= 4096)
    for (int32_t t = 0; t < count; t++) {
        if (sizes[t] <= 0) continue;
        int64_t first_tile = firsts[t] / TILE, last_tile = (firsts[t] + sizes[t] - 1) / TILE;
        #pragma omp for schedule(static) nowait
        for (int64_t tile = first_tile; tile <= last_tile; tile++)
            add_tile(sources[t], targets[t], firsts[t], sizes[t], tile, chain, seeds + (int64_t)t * chain,
                     scales + (int64_t)t * chain, used, alpha, beta, rademacher);
    }
}

int32_t zo_abi_version(void) { return ZO_PHILOX_ABI; }
