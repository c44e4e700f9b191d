// CPU kernels of the torch-q4 backend: a Q4_0 x Q8_0 matrix product for few rows, and the other parts of a
// decoder layer. Compiled on the machine that runs them (-march=native), see kernels/__init__.py.
//
// Batch invariance by construction: every output value is computed by the same instructions in the same
// order whatever the number of rows in the call (threads split output columns or rows, never a sum). So a
// verify window of k rows gives bitwise the logits of k one-token steps, and greedy speculation reproduces
// plain decoding exactly.
//
// The same arithmetic has three spellings: AVX512-VNNI, AVX2 and portable C++ (SPECSERVE_GENERIC, or a CPU
// with neither). Integer dot products are exact in all three, and the float operations (int -> float,
// scale product, fused multiply-add, the reduction trees) are the same, so all three give bitwise the same
// results; kernels/__init__.py checks this machine's path against the portable one before using it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if !defined(SPECSERVE_GENERIC) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

#if defined(SPECSERVE_GENERIC)
#define ISA_NAME "generic"
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define USE_AVX512 1
#define USE_AVX2 1
#define ISA_NAME "avx512-vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define USE_AVX2 1
#define ISA_NAME "avx2"
#else
#define ISA_NAME "generic"
#endif

namespace {

constexpr int QK = 32;  // values per Q4_0 / Q8_0 block
#ifdef USE_AVX512
constexpr int64_t TILE = 16;  // output columns per weight tile: one vector of int32 lanes
constexpr int ROW_GROUP = 8;  // rows computed per pass over a tile's weights (registers allow)
#else
constexpr int64_t TILE = 8;
constexpr int ROW_GROUP = 4;
#endif
constexpr int64_t TILE_BYTES = TILE * QK / 2;  // one block of a tile: TILE columns x 32 nibbles
constexpr int64_t PREFETCH = 4096;            // bytes ahead in the weight stream (measured: 1-4 KiB)

// ---------------------------------------------------------------------------------------------------------
// fp16 -> fp32 (exact), for the portable path

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
    }
  } else if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// ---------------------------------------------------------------------------------------------------------
// Activations: Q8_0 per block of 32 (llama.cpp's scheme): d = amax / 127, q = round-to-nearest-even(x / d).
// `offset` is 8 * sum(q): weights are stored as unsigned nibbles w + 8, and this takes the 8 back out.

void quantize_block(const float* src, int8_t* dst, float* d, int32_t* offset) {
#ifdef USE_AVX2
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(src + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float scale = _mm_cvtss_f32(m) / 127.f;
  const __m256 inv = _mm256_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
  sum4 = _mm_hadd_epi32(sum4, sum4);
  sum4 = _mm_hadd_epi32(sum4, sum4);
  // int32 -> int8 keeping element order (the packs interleave 128-bit lanes; the permute undoes it)
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d = scale;
  *offset = 8 * _mm_cvtsi128_si32(sum4);
#else
  float amax = 0.f;
  for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float scale = amax / 127.f;
  const float inv = scale != 0.f ? 1.f / scale : 0.f;
  int32_t sum = 0;
  for (int i = 0; i < QK; ++i) {
    const int value = static_cast<int>(std::nearbyint(src[i] * inv));
    dst[i] = static_cast<int8_t>(value);
    sum += value;
  }
  *d = scale;
  *offset = 8 * sum;
#endif
}

struct QuantizedRows {
  at::Tensor q, d, offset;  // [rows, k] int8, [rows, k/32] float, [rows, k/32] int32
};

QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1), nb = k / QK;
  QuantizedRows out{at::empty({rows, k}, x.options().dtype(at::kChar)), at::empty({rows, nb}, x.options()),
                    at::empty({rows, nb}, x.options().dtype(at::kInt))};
  const float* src = x.data_ptr<float>();
  int8_t* q = out.q.data_ptr<int8_t>();
  float* d = out.d.data_ptr<float>();
  int32_t* o = out.offset.data_ptr<int32_t>();
  at::parallel_for(0, rows * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_block(src + i * QK, q + i * QK, d + i, o + i);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Weights: per tile of TILE output columns and per block b of 32 inputs, TILE_BYTES bytes laid out as
// [g = 0..3][column][4 bytes]: byte i of group g of a column is its Q4_0 byte 4g+i, whose low nibble is
// input 4g+i and high nibble input 16+4g+i (llama.cpp's order). Then TILE fp16 scales per (tile, block).
//
// One row r, one tile, one block: dot[c] = sum_i (w[c][i] + 8) * x[i] - 8 * sum_i x[i], exact in int32;
// acc[c] = fma(float(dot[c]), scale_w[c] * scale_x, acc[c]) over the blocks in order.

template <int R>
void tile_rows(const uint8_t* w, const uint16_t* scales, int64_t nb, const int8_t* xq, const float* xd,
               const int32_t* xo, int64_t k, float* y, int64_t n) {
#if defined(USE_AVX512)
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE_BYTES;
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 192), _MM_HINT_T0);
    __m512i lo[4], hi[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512i p = _mm512_loadu_si512(reinterpret_cast<const void*>(wb + 64 * g));
      lo[g] = _mm512_and_si512(p, m4);
      hi[g] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * TILE)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * k + b * QK;
      __m512i dot = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        int32_t x_lo, x_hi;
        std::memcpy(&x_lo, xb + 4 * g, 4);
        std::memcpy(&x_hi, xb + 16 + 4 * g, 4);
        dot = _mm512_dpbusd_epi32(dot, lo[g], _mm512_set1_epi32(x_lo));
        dot = _mm512_dpbusd_epi32(dot, hi[g], _mm512_set1_epi32(x_hi));
      }
      dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(xo[r * nb + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * n, acc[r]);
#elif defined(USE_AVX2)
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE_BYTES;
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 64), _MM_HINT_T0);
    __m256i lo[4], hi[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * g));
      lo[g] = _mm256_and_si256(p, m4);
      hi[g] = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4);
    }
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * TILE)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * k + b * QK;
      // u8 (0..15) x s8 products summed in pairs into int16, then 8 such sums: 16 products of at most
      // 15 * 128 each, below 32767, so the int16 lanes never saturate
      __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        int32_t x_lo, x_hi;
        std::memcpy(&x_lo, xb + 4 * g, 4);
        std::memcpy(&x_hi, xb + 16 + 4 * g, 4);
        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(lo[g], _mm256_set1_epi32(x_lo)));
        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(hi[g], _mm256_set1_epi32(x_hi)));
      }
      const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(sum, ones), _mm256_set1_epi32(xo[r * nb + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_set1_ps(xd[r * nb + b])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * n, acc[r]);
#else
  float acc[R][TILE] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE_BYTES;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * k + b * QK;
      const float dx = xd[r * nb + b];
      for (int64_t c = 0; c < TILE; ++c) {
        int32_t dot = 0;
        for (int g = 0; g < 4; ++g)
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = wb[(g * TILE + c) * 4 + i];
            dot += (byte & 0x0F) * xb[4 * g + i] + (byte >> 4) * xb[16 + 4 * g + i];
          }
        dot -= xo[r * nb + b];
        acc[r][c] = std::fma(static_cast<float>(dot), half_to_float(scales[b * TILE + c]) * dx, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < TILE; ++c) y[r * n + c] = acc[r][c];
#endif
}

// y = x W^T (+ bias): x float [rows, k]; weight and scales as packed by kernels/__init__.py for n outputs.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float [rows, k]");
  const int64_t rows = x.size(0), k = x.size(1), nb = k / QK, tiles = n / TILE;
  TORCH_CHECK(k % QK == 0 && n % TILE == 0, "k must be a multiple of 32 and n of the tile width");
  TORCH_CHECK(weight.numel() == n * k / 2 && scales.numel() == n * nb, "weights do not match n and k");
  TORCH_CHECK(!bias || bias->numel() == n, "bias does not match n");
  auto y = at::empty({rows, n}, x.options());
  const QuantizedRows xq = quantize_rows(x);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const int8_t* q = xq.q.data_ptr<int8_t>();
  const float* d = xq.d.data_ptr<float>();
  const int32_t* o = xq.offset.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  const int64_t groups = (rows + ROW_GROUP - 1) / ROW_GROUP;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* wt = w + t * nb * TILE_BYTES;
      const uint16_t* st = s + t * nb * TILE;
      for (int64_t g = 0, r0 = 0; g < groups; ++g) {
        const int64_t count = (rows - r0) / (groups - g);  // groups of near-equal size
        float* yr = out + r0 * n + t * TILE;
        const int8_t* qr = q + r0 * k;
        const float* dr = d + r0 * nb;
        const int32_t* orr = o + r0 * nb;
        switch (count) {
#ifdef USE_AVX512
          case 8: tile_rows<8>(wt, st, nb, qr, dr, orr, k, yr, n); break;
          case 7: tile_rows<7>(wt, st, nb, qr, dr, orr, k, yr, n); break;
          case 6: tile_rows<6>(wt, st, nb, qr, dr, orr, k, yr, n); break;
          case 5: tile_rows<5>(wt, st, nb, qr, dr, orr, k, yr, n); break;
#endif
          case 4: tile_rows<4>(wt, st, nb, qr, dr, orr, k, yr, n); break;
          case 3: tile_rows<3>(wt, st, nb, qr, dr, orr, k, yr, n); break;
          case 2: tile_rows<2>(wt, st, nb, qr, dr, orr, k, yr, n); break;
          default: tile_rows<1>(wt, st, nb, qr, dr, orr, k, yr, n); break;
        }
        r0 += count;
      }
    }
  });
  if (bias) {
    const float* b = bias->data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; ++c) out[r * n + c] += b[c];
  }
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// The rest of a decoder layer, row by row.

// Sum of a[i] * b[i]: eight partial sums (one per AVX2 lane) combined by a fixed tree.
float dot(const float* a, const float* b, int64_t n) {
#ifdef USE_AVX2
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float lane[8];
  _mm256_store_ps(lane, acc);
#else
  float lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] = std::fma(a[i + j], b[i + j], lane[j]);
#endif
  float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) sum = std::fma(a[i], b[i], sum);
  return sum;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [rows, d]");
  const int64_t rows = x.size(0), d = x.size(1);
  auto y = at::empty({rows, d}, x.options());
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = src + r * d;
      const float scale = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) dst[r * d + i] = xr[i] * scale * w[i];
    }
  });
  return y;
}

// Rows of qkv at positions start, start+1, ...: rotate q and k (NEOX style, over halves of each head, as
// llama.cpp does for qwen2), write k and v into the caches [kv_heads, capacity, head_dim], return q.
at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                          at::Tensor& v_cache, int64_t start, int64_t n_heads) {
  TORCH_CHECK(qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors");
  const int64_t rows = qkv.size(0), width = qkv.size(1), n_kv = k_cache.size(0), capacity = k_cache.size(1),
                hd = k_cache.size(2), half = hd / 2;
  TORCH_CHECK(width == (n_heads + 2 * n_kv) * hd && start + rows <= capacity, "qkv or cache of the wrong size");
  auto q = at::empty({rows, n_heads * hd}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  float* qd = q.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  auto rotate = [half](const float* in, float* out, const float* c, const float* s) {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = in[i] * c[i] - in[i + half] * s[i];
      out[i + half] = in[i + half] * c[i + half] + in[i] * s[i + half];
    }
  };
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * width;
    const float* c = cs + (start + r) * hd;
    const float* s = sn + (start + r) * hd;
    for (int64_t h = 0; h < n_heads; ++h) rotate(row + h * hd, qd + (r * n_heads + h) * hd, c, s);
    for (int64_t h = 0; h < n_kv; ++h) {
      rotate(row + (n_heads + h) * hd, kc + (h * capacity + start + r) * hd, c, s);
      std::memcpy(vc + (h * capacity + start + r) * hd, row + (n_heads + n_kv + h) * hd, hd * sizeof(float));
    }
  }
  return q;
}

// Row r (position start + r) attends to cached positions 0..start+r, as a one-token step there would.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
                     double scale) {
  const int64_t rows = q.size(0), n_kv = k_cache.size(0), capacity = k_cache.size(1), hd = k_cache.size(2);
  const int64_t heads = q.size(1) / hd, group = heads / n_kv;
  TORCH_CHECK(q.is_contiguous() && start + rows <= capacity, "q or cache of the wrong size");
  auto out = at::empty({rows, heads * hd}, q.options());
  const float* qd = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(start + rows);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / heads, h = job % heads, n = start + r + 1;
      const float* qh = qd + job * hd;
      const float* kh = kc + (h / group) * capacity * hd;
      const float* vh = vc + (h / group) * capacity * hd;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) top = std::max(top, p[j] = dot(qh, kh + j * hd, hd) * sc);
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += p[j] = std::exp(p[j] - top);
      float* o = od + job * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < hd; ++i) o[i] = std::fma(p[j], vh[j * hd + i], o[i]);
      const float inv = 1.f / total;
      for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
    }
  });
  return out;
}

// exp(x) for x <= 0 (Cephes' single-precision polynomial, 2^n * e^r): one definition for every path.
#ifdef USE_AVX2
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(-n, 0.693359375f, x);
  r = std::fma(-n, -2.12194440e-4f, r);
  float p = 1.9875691500E-4f;
  p = std::fma(p, r, 1.3981999507E-3f);
  p = std::fma(p, r, 8.3334519073E-3f);
  p = std::fma(p, r, 4.1665795894E-2f);
  p = std::fma(p, r, 1.6666665459E-1f);
  p = std::fma(p, r, 5.0000001201E-1f);
  p = std::fma(p, r * r, r + 1.f);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// silu(g) * u for gate_up = [g | u] per row. With e = exp(-|g|) (never overflows), sigmoid(g) is 1 / (1 + e)
// for g >= 0 and e / (1 + e) below (1 - 1 / (1 + e) would cancel to 0).
inline float silu_mul_one(float g, float u) {
  const float e = exp_nonpositive(-std::fabs(g));
  const float inv = 1.f / (1.f + e);
  return g * (g >= 0.f ? inv : e * inv) * u;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous(), "gate_up: contiguous [rows, 2d]");
  const int64_t rows = gate_up.size(0), d = gate_up.size(1) / 2;
  auto y = at::empty({rows, d}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  constexpr int64_t CHUNK = 512;
  const int64_t chunks = (d + CHUNK - 1) / CHUNK;
  at::parallel_for(0, rows * chunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / chunks, lo = (job % chunks) * CHUNK, hi = std::min(d, lo + CHUNK);
      const float* g = src + r * 2 * d;
      const float* u = g + d;
      float* o = dst + r * d;
      int64_t i = lo;
#ifdef USE_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      const __m256 sign = _mm256_set1_ps(-0.f);
      for (; i + 8 <= hi; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp_nonpositive(_mm256_or_ps(gv, sign));
        const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_GE_OQ));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < hi; ++i) o[i] = silu_mul_one(g[i], u[i]);
    }
  });
  return y;
}

int64_t tile_width() { return TILE; }
std::string isa() { return ISA_NAME; }

}  // namespace

TORCH_LIBRARY(SPECSERVE_NAMESPACE, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias, int n) -> Tensor", &q4_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def(
      "rope_and_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
      "int n_heads) -> Tensor",
      &rope_and_cache);
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, int start, float scale) -> Tensor", &attention);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("tile_width() -> int", &tile_width);
  m.def("isa() -> str", &isa);
}
