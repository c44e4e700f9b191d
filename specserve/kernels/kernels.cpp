// CPU kernels of the torch-q4 backend: products of llama.cpp's weight types with int8 activations for few
// rows, and the other parts of a decoder layer. Compiled on the machine that runs them (-march=native), see
// kernels/__init__.py.
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
#include <type_traits>
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
constexpr int ROW_GROUP = 5;  // of 4..8, the fastest for windows of 2..9 rows (docs/hardware.md)
#endif
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
// Activations, quantized to int8 as llama.cpp does for each weight type: per block of 32 (Q8_0, for Q4_0
// weights) or of 256 (Q8_K, for the K-quants): d = amax / 127, q = round-to-nearest-even(x / d). Sums of q
// per 16 and 32 values go with them (the weights' offsets and mins multiply them).

float absmax(const float* src, int64_t n) {
#ifdef USE_AVX2
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + i)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
#else
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(src[i]));
  return amax;
#endif
}

// 32 values times `inv`, rounded to int8; sums[0] and sums[1]: the sums of the first and last 16.
void quantize_32(const float* src, float inv, int8_t* dst, int32_t* sums) {
#ifdef USE_AVX2
  const __m256 mul = _mm256_set1_ps(inv);
  __m256i q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_cvtps_epi32(
        _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * i), mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (int half = 0; half < 2; ++half) {
    const __m256i s8 = _mm256_add_epi32(q[2 * half], q[2 * half + 1]);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    sums[half] = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
  }
  // int32 -> int8 keeping element order (the packs interleave 128-bit lanes; the permute undoes it)
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
  sums[0] = sums[1] = 0;
  for (int i = 0; i < QK; ++i) {
    const int value = static_cast<int>(std::nearbyint(src[i] * inv));
    dst[i] = static_cast<int8_t>(value);
    sums[i / 16] += value;
  }
#endif
}

struct QuantizedRows {
  at::Tensor q, d, sums;  // [rows, k] int8; [rows, k / block] float; [rows, k / 16] int32
  int64_t block;
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t block) {
  const int64_t rows = x.size(0), k = x.size(1), nb = k / block;
  QuantizedRows out{at::empty({rows, k}, x.options().dtype(at::kChar)), at::empty({rows, nb}, x.options()),
                    at::empty({rows, k / 16}, x.options().dtype(at::kInt)), block};
  const float* src = x.data_ptr<float>();
  int8_t* q = out.q.data_ptr<int8_t>();
  float* d = out.d.data_ptr<float>();
  int32_t* sums = out.sums.data_ptr<int32_t>();
  at::parallel_for(0, rows * nb, 256 / block * 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float scale = absmax(src + i * block, block) / 127.f;
      const float inv = scale != 0.f ? 1.f / scale : 0.f;
      for (int64_t j = 0; j < block; j += QK) quantize_32(src + i * block + j, inv, q + i * block + j, sums + (i * block + j) / 16);
      d[i] = scale;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Weights, in tiles of TILE output columns (kernels/__init__.py packs them). The 4-bit codes of a block of
// 32 inputs take TILE * 16 bytes, laid out [g = 0..3][column][4 bytes]: byte i of group g holds input 4g+i
// in its low nibble and input 16+4g+i in its high nibble (llama.cpp's Q4_0 order). A vector of group g
// then holds 4 consecutive inputs of every column of the tile, against which one row's 4 inputs are
// broadcast: one multiply-add instruction per 4 inputs x TILE columns.
//
//   Q4_0  w = d (q - 8), per block of 32: codes, then TILE fp16 d per block.
//   Q4_1  w = d q + m: as Q4_0, with [d of the tile][m of the tile] per block.
//   Q5_0, Q5_1  as Q4_0 and Q4_1 with 5-bit codes (q - 16): the low 4 bits as above, the fifth in TILE * 4
//         more bytes per block ([column][4 bytes]: bit g of byte i is input 4g+i's, bit 4+g input 16+4g+i's).
//   Q8_0  w = d q, q an int8: TILE * 32 bytes per block, [g = 0..7][column][4 bytes] (inputs 4g..4g+3).
//   Q4_K  w = d sc q - dmin m per sub-block of 32 (sc, m: 6-bit integers), d and dmin per super-block of
//         256: the integer dot products of the 8 sub-blocks times sc (and of the activations' sums times m)
//         add up exactly, then one float multiply-add each per super-block. As llama.cpp computes it.
//   Q5_K  as Q4_K with 5-bit codes, the fifth bits as Q5_0's.
//   Q6_K  w = d sc (q - 32) per sub-block of 16 (sc: int8), q of 6 bits: the low 4 as above, the high 2 in
//         TILE * 8 more bytes per 32 inputs ([half][column][4 bytes]: bits 2g..2g+1 of byte i are those of
//         input 4g+i, or 16+4g+i in the second half).
//
// Each output is fma'd from exact integers in a fixed order of blocks, whatever the number of rows.

// The u8 x s8 products of 4 inputs x TILE columns for one row: int16 pair sums (maddubs, AVX2) or int32
// sums of 4 (dpbusd, AVX512-VNNI); the helpers below hide which.
#if defined(USE_AVX512)
using ivec = __m512i;
using fvec = __m512;
inline ivec load_bytes(const uint8_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
inline ivec and_bytes(ivec a, int mask) { return _mm512_and_si512(a, _mm512_set1_epi8(static_cast<char>(mask))); }
inline ivec shift_right(ivec a, int bits) { return _mm512_srli_epi16(a, bits); }
inline ivec shift_left(ivec a, int bits) { return _mm512_slli_epi16(a, bits); }
inline ivec or_bytes(ivec a, ivec b) { return _mm512_or_si512(a, b); }
inline ivec broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}
inline ivec zero() { return _mm512_setzero_si512(); }
inline ivec add32(ivec a, ivec b) { return _mm512_add_epi32(a, b); }
inline ivec sub32(ivec a, ivec b) { return _mm512_sub_epi32(a, b); }
inline ivec mul32(ivec a, ivec b) { return _mm512_mullo_epi32(a, b); }
inline ivec set32(int32_t v) { return _mm512_set1_epi32(v); }
inline ivec u8_to_32(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline ivec s8_to_32(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline fvec half_to_f(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline fvec fzero() { return _mm512_setzero_ps(); }
inline fvec fmul_scalar(fvec a, float b) { return _mm512_mul_ps(a, _mm512_set1_ps(b)); }
inline fvec fma_i(ivec a, fvec b, fvec c) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), b, c); }
inline fvec fnma_i(ivec a, fvec b, fvec c) { return _mm512_fnmadd_ps(_mm512_cvtepi32_ps(a), b, c); }
inline void fstore(float* p, fvec v) { _mm512_storeu_ps(p, v); }
// Sum over N groups of 4 inputs: codes[i] . x(4 bytes at xs[i]), exact int32 per column.
template <int N, int BITS>
inline ivec dot_groups(const ivec* codes, const int8_t* const* xs) {
  ivec acc = zero();
  for (int i = 0; i < N; ++i) acc = _mm512_dpbusd_epi32(acc, codes[i], broadcast4(xs[i]));
  return acc;
}
// acc plus the products of two code vectors with 4 inputs each (block_dots); `widened`: acc as int32 sums.
inline ivec add_products(ivec acc, ivec a, const int8_t* xa, ivec b, const int8_t* xb) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, a, broadcast4(xa)), b, broadcast4(xb));
}
inline ivec widened(ivec acc) { return acc; }
// s8 codes x s8 inputs (Q8_0), sum over the 8 groups of a block: dpbusd takes u8, so the codes go in offset by
// 128 (`prepare_signed`, once per block) and 128 * sum(x) comes off.
inline ivec prepare_signed(ivec w) { return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80))); }
inline ivec dot_signed(const ivec* w, const ivec* prepared, const int8_t* x, int32_t sum) {
  (void)w;
  ivec acc = zero();
#pragma GCC unroll 8
  for (int g = 0; g < 8; ++g) acc = _mm512_dpbusd_epi32(acc, prepared[g], broadcast4(x + 4 * g));
  return sub32(acc, set32(128 * sum));
}
#elif defined(USE_AVX2)
using ivec = __m256i;
using fvec = __m256;
inline ivec load_bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline ivec and_bytes(ivec a, int mask) { return _mm256_and_si256(a, _mm256_set1_epi8(static_cast<char>(mask))); }
inline ivec shift_right(ivec a, int bits) { return _mm256_srli_epi16(a, bits); }
inline ivec shift_left(ivec a, int bits) { return _mm256_slli_epi16(a, bits); }
inline ivec or_bytes(ivec a, ivec b) { return _mm256_or_si256(a, b); }
inline ivec broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}
inline ivec zero() { return _mm256_setzero_si256(); }
inline ivec add32(ivec a, ivec b) { return _mm256_add_epi32(a, b); }
inline ivec sub32(ivec a, ivec b) { return _mm256_sub_epi32(a, b); }
inline ivec mul32(ivec a, ivec b) { return _mm256_mullo_epi32(a, b); }
inline ivec set32(int32_t v) { return _mm256_set1_epi32(v); }
inline ivec u8_to_32(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline ivec s8_to_32(const int8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline fvec half_to_f(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline fvec fzero() { return _mm256_setzero_ps(); }
inline fvec fmul_scalar(fvec a, float b) { return _mm256_mul_ps(a, _mm256_set1_ps(b)); }
inline fvec fma_i(ivec a, fvec b, fvec c) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), b, c); }
inline fvec fnma_i(ivec a, fvec b, fvec c) { return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(a), b, c); }
inline void fstore(float* p, fvec v) { _mm256_storeu_ps(p, v); }
// maddubs adds pairs of u8 x s8 products into int16 lanes, which must not saturate: with codes of BITS bits
// (below 2^BITS) and |x| <= 128, a lane of `terms` summed pairs holds 2 * terms * (2^BITS - 1) * 128, so
// 4-bit codes may add all 8 groups in int16 (30720), 5-bit codes 4 (31744) and 6-bit codes 2 (32256) before
// widening exactly.
template <int N, int BITS>
inline ivec dot_groups(const ivec* codes, const int8_t* const* xs) {
  constexpr int terms = std::min(8, 32767 / (2 * ((1 << BITS) - 1) * 128));
  const __m256i ones = _mm256_set1_epi16(1);
  ivec acc = zero();
#pragma GCC unroll 8
  for (int i = 0; i < N; i += terms) {
    __m256i pairs = _mm256_maddubs_epi16(codes[i], broadcast4(xs[i]));
#pragma GCC unroll 8
    for (int j = i + 1; j < i + terms && j < N; ++j)
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(codes[j], broadcast4(xs[j])));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
  }
  return acc;
}
// acc plus the products of two code vectors with 4 inputs each (block_dots), as int16 pair sums: all 8
// groups of a block of 4-bit codes fit (see dot_groups); `widened`: those sums as int32.
inline ivec add_products(ivec acc, ivec a, const int8_t* xa, ivec b, const int8_t* xb) {
  return _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(a, broadcast4(xa)),
                                                _mm256_maddubs_epi16(b, broadcast4(xb))));
}
inline ivec widened(ivec acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
// s8 codes x s8 inputs (Q8_0), sum over the 8 groups of a block: maddubs takes u8, so |w| (`prepare_signed`,
// once per block) meets x sign(w). A pair is at most 2 * 128 * 127, so each group is widened on its own.
inline ivec prepare_signed(ivec w) { return _mm256_abs_epi8(w); }
inline ivec dot_signed(const ivec* w, const ivec* prepared, const int8_t* x, int32_t sum) {
  (void)sum;
  const __m256i ones = _mm256_set1_epi16(1);
  ivec acc = zero();
#pragma GCC unroll 8
  for (int g = 0; g < 8; ++g)
    acc = add32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(prepared[g], _mm256_sign_epi8(broadcast4(x + 4 * g), w[g])),
                                       ones));
  return acc;
}
#endif

// Every cache line of the block's codes, TILE * 16 bytes: 2 lines for AVX2, 4 for AVX512 (prefetching only
// the first 2 left the AVX512 path waiting on memory: 5 rows cost 1.9x one row instead of 1.0x on Zen 5).
inline void prefetch(const uint8_t* p) {
#if defined(USE_AVX2)
#pragma GCC unroll 4
  for (int64_t line = 0; line < TILE * 16; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH + line), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// Activations of R rows as the tiles read them.
struct Rows {
  const int8_t* q;     // [R, k]
  const float* d;      // [R, k / block]
  const int32_t* sums;  // [R, k / 16]
  int64_t k, block;
  const int8_t* at(int r, int64_t i) const { return q + r * k + i; }
  float scale(int r, int64_t i) const { return d[r * (k / block) + i / block]; }
  int32_t sum16(int r, int64_t i) const { return sums[r * (k / 16) + i / 16]; }
  int32_t sum32(int r, int64_t i) const { return sum16(r, i) + sum16(r, i + 16); }
};

#if defined(USE_AVX2)
// The codes of one block of 32 inputs: lo[g] inputs 4g.., hi[g] inputs 16+4g.. (g = 0..3).
inline void unpack4(const uint8_t* w, ivec* lo, ivec* hi) {
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const ivec p = load_bytes(w + g * TILE * 4);
    lo[g] = and_bytes(p, 0x0F);
    hi[g] = and_bytes(shift_right(p, 4), 0x0F);
  }
}

// One row's 4 consecutive inputs per group, for the block at input i.
inline void groups_of(const Rows& x, int r, int64_t i, const int8_t** lo, const int8_t** hi) {
  for (int g = 0; g < 4; ++g) {
    lo[g] = x.at(r, i + 4 * g);
    hi[g] = x.at(r, i + 16 + 4 * g);
  }
}

// The exact int32 dot products of one block of 4-bit codes (32 inputs x TILE columns, at w) with R rows'
// inputs from i on. Codes outer, rows inner: each group of 4 inputs is unpacked once and meets every row,
// so R sums stay in registers (rows outer kept 8 code vectors live per row, which the AVX2 build spilled).
// The sums are exact integers, so the order in which they add up cannot change a bit of the result.
template <int R>
inline void block_dots(const uint8_t* w, const Rows& x, int64_t i, ivec* dots) {
  for (int r = 0; r < R; ++r) dots[r] = zero();
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const ivec p = load_bytes(w + g * TILE * 4), lo = and_bytes(p, 0x0F), hi = and_bytes(shift_right(p, 4), 0x0F);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      dots[r] = add_products(dots[r], lo, x.at(r, i + 4 * g), hi, x.at(r, i + 16 + 4 * g));
  }
  for (int r = 0; r < R; ++r) dots[r] = widened(dots[r]);
}

// The 5-bit codes of one block: the low 4 bits as unpack4, the fifth from `high` (TILE * 4 bytes, [column][4
// bytes]: bit g of byte i is that of input 4g+i, bit 4+g that of input 16+4g+i).
inline void unpack5(const uint8_t* w, const uint8_t* high, ivec* lo, ivec* hi) {
  unpack4(w, lo, hi);
  const ivec h = load_bytes(high);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    lo[g] = or_bytes(lo[g], shift_left(and_bytes(shift_right(h, g), 0x01), 4));
    hi[g] = or_bytes(hi[g], shift_left(and_bytes(shift_right(h, 4 + g), 0x01), 4));
  }
}

// One row's exact int32 dot products with a block of unpacked codes of BITS bits (inputs from i on).
template <int BITS>
inline ivec row_dot(const ivec* lo, const ivec* hi, const Rows& x, int r, int64_t i) {
  const int8_t* xl[4];
  const int8_t* xh[4];
  groups_of(x, r, i, xl, xh);
  return add32(dot_groups<4, BITS>(lo, xl), dot_groups<4, BITS>(hi, xh));
}

// The exact dot products of one block of BITS-bit codes (4: block_dots; 5: unpacked with `high`) with R rows.
template <int R, int BITS>
inline void code_dots(const uint8_t* w, const uint8_t* high, int64_t block, const Rows& x, ivec* dots) {
  const int64_t i = block * QK;
  if constexpr (BITS == 4) {
    block_dots<R>(w + block * TILE * 16, x, i, dots);
  } else {
    ivec lo[4], hi[4];
    unpack5(w + block * TILE * 16, high + block * TILE * 4, lo, hi);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) dots[r] = row_dot<BITS>(lo, hi, x, r, i);
  }
}

// Q4_0 and Q5_0 (w = d (q - offset)), Q4_1 and Q5_1 (MIN: w = d q + m): d (and m) fp16 per block of 32.
template <int R, int BITS, bool MIN>
void tile_q32(const uint8_t* w, const uint8_t* high, const uint16_t* dm, const Rows& x, float* y, int64_t n) {
  constexpr int32_t offset = MIN ? 0 : 1 << (BITS - 1);
  constexpr int64_t per_block = MIN ? 2 * TILE : TILE;  // fp16 values of a block: d, then m
  const int64_t nb = x.k / QK;
  fvec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fzero();
  for (int64_t b = 0; b < nb; ++b) {
    prefetch(w + b * TILE * 16);
    ivec dots[R];
    code_dots<R, BITS>(w, high, b, x, dots);
    const fvec d = half_to_f(dm + b * per_block);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int32_t sum = x.sum32(r, b * QK);
      const float dx = x.scale(r, b * QK);
      acc[r] = fma_i(sub32(dots[r], set32(offset * sum)), fmul_scalar(d, dx), acc[r]);
      if constexpr (MIN) acc[r] = fma_i(set32(sum), fmul_scalar(half_to_f(dm + b * per_block + TILE), dx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) fstore(y + r * n, acc[r]);
}

template <int R>
void tile_q8_0(const uint8_t* w, const uint16_t* scales, const Rows& x, float* y, int64_t n) {
  const int64_t nb = x.k / QK;
  fvec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fzero();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE * 32;
    prefetch(wb);
    prefetch(wb + TILE * 16);
    ivec codes[8], prepared[8];
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) prepared[g] = prepare_signed(codes[g] = load_bytes(wb + g * TILE * 4));
    const fvec ws = half_to_f(scales + b * TILE);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int32_t sum = x.sum32(r, b * QK);
      acc[r] = fma_i(dot_signed(codes, prepared, x.at(r, b * QK), sum), fmul_scalar(ws, x.scale(r, b * QK)), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) fstore(y + r * n, acc[r]);
}

// Q4_K and Q5_K (BITS 5: the fifth bits in `high`).
template <int R, int BITS>
void tile_k(const uint8_t* w, const uint8_t* high, const uint8_t* sc, const uint8_t* mins, const uint16_t* dd,
            const Rows& x, float* y, int64_t n) {
  const int64_t nsb = x.k / 256;
  fvec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fzero();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    ivec total[R], low[R];
    for (int r = 0; r < R; ++r) total[r] = low[r] = zero();
    for (int s = 0; s < 8; ++s) {
      const int64_t block = sb * 8 + s;
      prefetch(w + block * TILE * 16);
      ivec dots[R];
      code_dots<R, BITS>(w, high, block, x, dots);
      const ivec scale = u8_to_32(sc + block * TILE), min = u8_to_32(mins + block * TILE);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        total[r] = add32(total[r], mul32(dots[r], scale));
        const int32_t sum = x.sum32(r, block * QK);
        low[r] = add32(low[r], mul32(min, set32(sum)));
      }
    }
    const fvec d = half_to_f(dd + sb * 2 * TILE), dmin = half_to_f(dd + sb * 2 * TILE + TILE);
    for (int r = 0; r < R; ++r) {
      const float dx = x.scale(r, sb * 256);
      acc[r] = fnma_i(low[r], fmul_scalar(dmin, dx), fma_i(total[r], fmul_scalar(d, dx), acc[r]));
    }
  }
  for (int r = 0; r < R; ++r) fstore(y + r * n, acc[r]);
}

template <int R>
void tile_q6_k(const uint8_t* w, const uint8_t* high, const int8_t* sc, const uint16_t* dd, const Rows& x, float* y,
               int64_t n) {
  const int64_t nsb = x.k / 256;
  fvec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fzero();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    ivec total[R];
    for (int r = 0; r < R; ++r) total[r] = zero();
    for (int c = 0; c < 8; ++c) {  // blocks of 32 inputs: Q6_K sub-blocks 2c and 2c+1
      const int64_t block = sb * 8 + c;
      const uint8_t* wb = w + block * TILE * 16;
      prefetch(wb);
      ivec lo[4], hi[4];
      unpack4(wb, lo, hi);
      const ivec h_lo = load_bytes(high + block * TILE * 8), h_hi = load_bytes(high + block * TILE * 8 + TILE * 4);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        lo[g] = or_bytes(lo[g], shift_left(and_bytes(shift_right(h_lo, 2 * g), 0x03), 4));
        hi[g] = or_bytes(hi[g], shift_left(and_bytes(shift_right(h_hi, 2 * g), 0x03), 4));
      }
      const ivec scale_lo = s8_to_32(sc + (2 * block) * TILE), scale_hi = s8_to_32(sc + (2 * block + 1) * TILE);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int8_t* xl[4];
        const int8_t* xh[4];
        groups_of(x, r, block * QK, xl, xh);
        const ivec dot_lo = sub32(dot_groups<4, 6>(lo, xl), set32(32 * x.sum16(r, block * QK)));
        const ivec dot_hi = sub32(dot_groups<4, 6>(hi, xh), set32(32 * x.sum16(r, block * QK + 16)));
        total[r] = add32(total[r], add32(mul32(dot_lo, scale_lo), mul32(dot_hi, scale_hi)));
      }
    }
    const fvec d = half_to_f(dd + sb * TILE);
    for (int r = 0; r < R; ++r) acc[r] = fma_i(total[r], fmul_scalar(d, x.scale(r, sb * 256)), acc[r]);
  }
  for (int r = 0; r < R; ++r) fstore(y + r * n, acc[r]);
}

#else  // portable: the same integers and the same float operations, one column at a time

// The codes of input i (0..31) of column c in a block.
inline int code4(const uint8_t* w, int64_t c, int i) {
  const int j = i % 16, g = j / 4;
  const uint8_t byte = w[(g * TILE + c) * 4 + j % 4];
  return i < 16 ? byte & 0x0F : byte >> 4;
}

inline int code6(const uint8_t* w, const uint8_t* high, int64_t c, int i) {
  const int j = i % 16, g = j / 4;
  const uint8_t h = high[((i / 16) * TILE + c) * 4 + j % 4];
  return code4(w, c, i) | (((h >> (2 * g)) & 3) << 4);
}

inline int code5(const uint8_t* w, const uint8_t* high, int64_t c, int i) {
  const int j = i % 16, g = j / 4;
  const uint8_t h = high[c * 4 + j % 4];
  return code4(w, c, i) | (((h >> (i < 16 ? g : 4 + g)) & 1) << 4);
}

// The exact dot product of column c's codes of BITS bits in block `block` with 32 inputs x.
template <int BITS>
inline int32_t dot_block(const uint8_t* w, const uint8_t* high, int64_t block, int64_t c, const int8_t* x) {
  int32_t dot = 0;
  for (int i = 0; i < QK; ++i)
    dot += (BITS == 4 ? code4(w + block * TILE * 16, c, i) : code5(w + block * TILE * 16, high + block * TILE * 4, c, i)) *
           x[i];
  return dot;
}

template <int R, int BITS, bool MIN>
void tile_q32(const uint8_t* w, const uint8_t* high, const uint16_t* dm, const Rows& x, float* y, int64_t n) {
  constexpr int32_t offset = MIN ? 0 : 1 << (BITS - 1);
  constexpr int64_t per_block = MIN ? 2 * TILE : TILE;
  const int64_t nb = x.k / QK;
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < TILE; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int32_t sum = x.sum32(r, b * QK);
        const float dx = x.scale(r, b * QK);
        const int32_t dot = dot_block<BITS>(w, high, b, c, x.at(r, b * QK)) - offset * sum;
        acc = std::fma(static_cast<float>(dot), half_to_float(dm[b * per_block + c]) * dx, acc);
        if constexpr (MIN) acc = std::fma(static_cast<float>(sum), half_to_float(dm[b * per_block + TILE + c]) * dx, acc);
      }
      y[r * n + c] = acc;
    }
}

template <int R>
void tile_q8_0(const uint8_t* w, const uint16_t* scales, const Rows& x, float* y, int64_t n) {
  const int64_t nb = x.k / QK;
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < TILE; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* xb = x.at(r, b * QK);
        int32_t dot = 0;
        for (int i = 0; i < QK; ++i) dot += static_cast<int8_t>(w[b * TILE * 32 + ((i / 4) * TILE + c) * 4 + i % 4]) * xb[i];
        acc = std::fma(static_cast<float>(dot), half_to_float(scales[b * TILE + c]) * x.scale(r, b * QK), acc);
      }
      y[r * n + c] = acc;
    }
}

template <int R, int BITS>
void tile_k(const uint8_t* w, const uint8_t* high, const uint8_t* sc, const uint8_t* mins, const uint16_t* dd,
            const Rows& x, float* y, int64_t n) {
  const int64_t nsb = x.k / 256;
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < TILE; ++c) {
      float acc = 0.f;
      for (int64_t sb = 0; sb < nsb; ++sb) {
        int32_t total = 0, low = 0;
        for (int s = 0; s < 8; ++s) {
          const int64_t block = sb * 8 + s;
          total += dot_block<BITS>(w, high, block, c, x.at(r, block * QK)) * sc[block * TILE + c];
          low += mins[block * TILE + c] * x.sum32(r, block * QK);
        }
        const float dx = x.scale(r, sb * 256);
        const float d = half_to_float(dd[sb * 2 * TILE + c]), dmin = half_to_float(dd[sb * 2 * TILE + TILE + c]);
        acc = std::fma(-static_cast<float>(low), dmin * dx, std::fma(static_cast<float>(total), d * dx, acc));
      }
      y[r * n + c] = acc;
    }
}

template <int R>
void tile_q6_k(const uint8_t* w, const uint8_t* high, const int8_t* sc, const uint16_t* dd, const Rows& x, float* y,
               int64_t n) {
  const int64_t nsb = x.k / 256;
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < TILE; ++c) {
      float acc = 0.f;
      for (int64_t sb = 0; sb < nsb; ++sb) {
        int32_t total = 0;
        for (int b = 0; b < 8; ++b) {
          const int64_t block = sb * 8 + b;
          const int8_t* xb = x.at(r, block * QK);
          for (int half = 0; half < 2; ++half) {
            int32_t dot = 0;
            for (int i = 16 * half; i < 16 * half + 16; ++i)
              dot += code6(w + block * TILE * 16, high + block * TILE * 8, c, i) * xb[i];
            dot -= 32 * x.sum16(r, block * QK + 16 * half);
            total += dot * sc[(2 * block + half) * TILE + c];
          }
        }
        acc = std::fma(static_cast<float>(total), half_to_float(dd[sb * TILE + c]) * x.scale(r, sb * 256), acc);
      }
      y[r * n + c] = acc;
    }
}
#endif

// Calls tile(t, first_row, R) for every tile and every group of rows: near-equal groups of at most
// ROW_GROUP, R a compile-time constant (the kernels keep R rows' sums in registers).
template <class F>
void with_rows(int64_t count, F&& f) {
  switch (count) {
#ifdef USE_AVX512
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
#endif
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <class Tile>
at::Tensor gemm(const at::Tensor& x, int64_t n, int64_t block, const std::optional<at::Tensor>& bias, Tile&& tile) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float [rows, k]");
  const int64_t rows = x.size(0), k = x.size(1), tiles = n / TILE;
  TORCH_CHECK(k % block == 0 && n % TILE == 0, "k must be a multiple of the block and n of the tile width");
  TORCH_CHECK(!bias || bias->numel() == n, "bias does not match n");
  auto y = at::empty({rows, n}, x.options());
  const QuantizedRows xq = quantize_rows(x, block);
  float* out = y.data_ptr<float>();
  const int64_t groups = (rows + ROW_GROUP - 1) / ROW_GROUP;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t g = 0, r0 = 0; g < groups; ++g) {
        const int64_t count = (rows - r0) / (groups - g);
        const Rows part{xq.q.data_ptr<int8_t>() + r0 * k, xq.d.data_ptr<float>() + r0 * (k / block),
                        xq.sums.data_ptr<int32_t>() + r0 * (k / 16), k, block};
        with_rows(count, [&](auto R) { tile(t, part, out + r0 * n + t * TILE, R); });
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

const uint16_t* halves(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// y = x W^T (+ bias), x float [rows, k], W packed by kernels/pack.py for n outputs. Types with a scale per block
// of 32 (Q4_0, Q4_1, Q5_0, Q5_1): 4-bit codes, the fifth bits (BITS 5), d (and m: MIN) per block.
template <int BITS, bool MIN>
at::Tensor q32_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor* high, const at::Tensor& dm,
                      const std::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(1), nb = k / QK, per_block = MIN ? 2 : 1;
  TORCH_CHECK(codes.numel() == n * k / 2 && dm.numel() == per_block * n * nb && (!high || high->numel() == n * k / 8),
              "weights of a block-of-32 type do not match n and k");
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint8_t* h = high ? high->data_ptr<uint8_t>() : nullptr;
  const uint16_t* d = halves(dm);
  return gemm(x, n, QK, bias, [&](int64_t t, const Rows& rows, float* y, auto R) {
    tile_q32<decltype(R)::value, BITS, MIN>(w + t * nb * TILE * 16, h ? h + t * nb * TILE * 4 : nullptr,
                                            d + t * nb * per_block * TILE, rows, y, n);
  });
}

at::Tensor q4_0_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  return q32_linear<4, false>(x, codes, nullptr, scales, bias, n);
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& dm,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  return q32_linear<4, true>(x, codes, nullptr, dm, bias, n);
}

at::Tensor q5_0_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& high, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  return q32_linear<5, false>(x, codes, &high, scales, bias, n);
}

at::Tensor q5_1_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& high, const at::Tensor& dm,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  return q32_linear<5, true>(x, codes, &high, dm, bias, n);
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(1), nb = k / QK;
  TORCH_CHECK(codes.numel() == n * k && scales.numel() == n * nb, "Q8_0 weights do not match n and k");
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint16_t* s = halves(scales);
  return gemm(x, n, QK, bias, [&](int64_t t, const Rows& rows, float* y, auto R) {
    tile_q8_0<decltype(R)::value>(w + t * nb * TILE * 32, s + t * nb * TILE, rows, y, n);
  });
}

// Q4_K and Q5_K (BITS 5: with the fifth bits).
template <int BITS>
at::Tensor k_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor* high, const at::Tensor& sc,
                    const at::Tensor& mins, const at::Tensor& dd, const std::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(1), nb = k / QK, nsb = k / 256;
  TORCH_CHECK(codes.numel() == n * k / 2 && sc.numel() == n * nb && mins.numel() == n * nb && dd.numel() == 2 * n * nsb &&
                  (!high || high->numel() == n * k / 8),
              "K-quant weights do not match n and k");
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint8_t* h = high ? high->data_ptr<uint8_t>() : nullptr;
  const uint8_t* s = sc.data_ptr<uint8_t>();
  const uint8_t* m = mins.data_ptr<uint8_t>();
  const uint16_t* d = halves(dd);
  return gemm(x, n, 256, bias, [&](int64_t t, const Rows& rows, float* y, auto R) {
    tile_k<decltype(R)::value, BITS>(w + t * nb * TILE * 16, h ? h + t * nb * TILE * 4 : nullptr, s + t * nb * TILE,
                                     m + t * nb * TILE, d + t * nsb * 2 * TILE, rows, y, n);
  });
}

at::Tensor q4_k_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sc, const at::Tensor& mins,
                       const at::Tensor& dd, const std::optional<at::Tensor>& bias, int64_t n) {
  return k_linear<4>(x, codes, nullptr, sc, mins, dd, bias, n);
}

at::Tensor q5_k_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& high, const at::Tensor& sc,
                       const at::Tensor& mins, const at::Tensor& dd, const std::optional<at::Tensor>& bias, int64_t n) {
  return k_linear<5>(x, codes, &high, sc, mins, dd, bias, n);
}

at::Tensor q6_k_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& high, const at::Tensor& sc,
                       const at::Tensor& dd, const std::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(1), nb = k / QK, nsb = k / 256;
  TORCH_CHECK(codes.numel() == n * k / 2 && high.numel() == n * k / 4 && sc.numel() == n * k / 16 && dd.numel() == n * nsb,
              "Q6_K weights do not match n and k");
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint8_t* h = high.data_ptr<uint8_t>();
  const int8_t* s = sc.data_ptr<int8_t>();
  const uint16_t* d = halves(dd);
  return gemm(x, n, 256, bias, [&](int64_t t, const Rows& rows, float* y, auto R) {
    tile_q6_k<decltype(R)::value>(w + t * nb * TILE * 16, h + t * nb * TILE * 8, s + t * nb * 2 * TILE,
                                  d + t * nsb * TILE, rows, y, n);
  });
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

// Row r (position p = start + r) attends to cached positions 0..p, as a one-token step there would; with a
// sliding `window` (> 0) to the last `window` of them only (llama.cpp's masking: p - j < window).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
                     double scale, int64_t window) {
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
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const float* qh = qd + job * hd;
      const float* kh = kc + (h / group) * capacity * hd;
      const float* vh = vc + (h / group) * capacity * hd;
      float top = -INFINITY;
      for (int64_t j = first; j < n; ++j) top = std::max(top, p[j] = dot(qh, kh + j * hd, hd) * sc);
      float total = 0.f;
      for (int64_t j = first; j < n; ++j) total += p[j] = std::exp(p[j] - top);
      float* o = od + job * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t j = first; j < n; ++j)
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

// silu(g) * u and gelu(g) * u for gate_up = [g | u] per row. Both are g * sigmoid(z): z = g for silu, and for
// GeLU's tanh form z = 2 sqrt(2/pi) (g + 0.044715 g^3), since 1 + tanh(y) = 2 sigmoid(2y). With
// e = exp(-|z|) (never overflows), sigmoid(z) is 1 / (1 + e) for z >= 0 and e / (1 + e) below (1 - 1 / (1 + e)
// would cancel to 0).
constexpr float GELU_C1 = 1.5957691216057308f;   // 2 sqrt(2/pi)
constexpr float GELU_C3 = 0.07135481627159036f;  // 2 sqrt(2/pi) 0.044715

template <bool GELU>
inline float gated_one(float g, float u) {
  const float z = GELU ? g * std::fma(GELU_C3, g * g, GELU_C1) : g;
  const float e = exp_nonpositive(-std::fabs(z));
  const float inv = 1.f / (1.f + e);
  return g * (z >= 0.f ? inv : e * inv) * u;
}

template <bool GELU>
at::Tensor gated(const at::Tensor& gate_up) {
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
        const __m256 z = GELU ? _mm256_mul_ps(gv, _mm256_fmadd_ps(_mm256_set1_ps(GELU_C3), _mm256_mul_ps(gv, gv),
                                                                  _mm256_set1_ps(GELU_C1)))
                              : gv;
        const __m256 e = exp_nonpositive(_mm256_or_ps(z, sign));
        const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < hi; ++i) o[i] = gated_one<GELU>(g[i], u[i]);
    }
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) { return gated<false>(gate_up); }
at::Tensor gelu_tanh_mul(const at::Tensor& gate_up) { return gated<true>(gate_up); }

int64_t tile_width() { return TILE; }
std::string isa() { return ISA_NAME; }

}  // namespace

TORCH_LIBRARY(SPECSERVE_NAMESPACE, m) {
  m.def("linear_q4_0(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int n) -> Tensor", &q4_0_linear);
  m.def("linear_q4_1(Tensor x, Tensor codes, Tensor dm, Tensor? bias, int n) -> Tensor", &q4_1_linear);
  m.def("linear_q5_0(Tensor x, Tensor codes, Tensor high, Tensor scales, Tensor? bias, int n) -> Tensor",
        &q5_0_linear);
  m.def("linear_q5_1(Tensor x, Tensor codes, Tensor high, Tensor dm, Tensor? bias, int n) -> Tensor", &q5_1_linear);
  m.def("linear_q8_0(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int n) -> Tensor", &q8_0_linear);
  m.def("linear_q4_k(Tensor x, Tensor codes, Tensor sc, Tensor mins, Tensor dd, Tensor? bias, int n) -> Tensor",
        &q4_k_linear);
  m.def(
      "linear_q5_k(Tensor x, Tensor codes, Tensor high, Tensor sc, Tensor mins, Tensor dd, Tensor? bias, int n) -> "
      "Tensor",
      &q5_k_linear);
  m.def("linear_q6_k(Tensor x, Tensor codes, Tensor high, Tensor sc, Tensor dd, Tensor? bias, int n) -> Tensor",
        &q6_k_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def(
      "rope_and_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
      "int n_heads) -> Tensor",
      &rope_and_cache);
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, int start, float scale, int window) -> Tensor",
        &attention);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor", &gelu_tanh_mul);
  m.def("tile_width() -> int", &tile_width);
  m.def("isa() -> str", &isa);
}
