// Packed low-bit linear layer on CPU: y = (x_codes . w_codes) * w_scale / x_scale.
//
// Weights are packed in the kernel layout of qat/pack/kernel_layout.py: per row, blocks of 64 bytes; element
// e = 64 * plane + byte of a block sits in byte `byte`, bits [plane * BITS, (plane + 1) * BITS). Ternary
// (BITS=2) stores q = code + 1 in {0, 1, 2} (4 planes, 256 values per block); binary (BITS=1) stores
// b = (code + 1) / 2 in {0, 1} (8 planes, 512 values per block). One shift + mask turns a plane into 64 (or
// 2 x 32) unsigned bytes that line up with 64 contiguous int8 activations, so the SIMD dot product needs no
// shuffles (the I2_S / TQ2_0 idea, widened so AVX-512 and AVX2 read the same layout).
//
// Activations are quantized here, per token, with the formula of qat/quant/activation.py
// (scale = 127 / max(max|x|, 1e-5), codes = round-half-even(x * scale) clamped to int8), zero-padded to
// whole blocks so the kernels have no tails. The unsigned weights give u8 x s8 products, so
//   ternary: sum(code * x) = sum(q * x) - sum(x);   binary: sum(code * x) = 2 * sum(b * x) - sum(x).
// Integer sums are exact; the float epilogue rounds once per group and once for the division.
//
// Paths (chosen at run time, forced by name from Python via QAT_KERNEL_PATH): "avx512_vnni" (vpdpbusd on
// 64-byte blocks; from kIntMmMinTokens tokens on, unpack to int8 once per call and use at::_int_mm, i.e. oneDNN
// with AMX/VNNI), "avx2" (vpmaddubsw + vpmaddwd), "portable" (plain C++). Tokens are tiled by kTokenTile so
// one unpacked weight block serves several tokens (prefill).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QAT_X86 1
#endif

namespace {

constexpr int64_t kBlockBytes = 64;
constexpr int64_t kTokenTile = 4;        // tokens that share one unpacked weight block (registers)
constexpr int64_t kIntMmMinTokens = 32;  // from this batch on, unpack to int8 and use at::_int_mm

struct Activations {
  std::vector<int8_t> codes;   // (tokens, padded_k), zero-padded
  std::vector<float> scales;   // 127 / max|x| per token
};

template <typename scalar_t>
void quantize_tokens(const scalar_t* x, int64_t tokens, int64_t k, int64_t padded_k, Activations& a) {
  a.codes.assign(tokens * padded_k, 0);
  a.scales.assign(tokens, 0.f);
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = x + t * k;
      // 8 partial maxima (max is exact in any order) so the loop vectorizes instead of one serial maxss chain.
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t i = 0;
      for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; ++j) part[j] = std::max(part[j], std::fabs(static_cast<float>(row[i + j])));
      for (; i < k; ++i) part[0] = std::max(part[0], std::fabs(static_cast<float>(row[i])));
      float amax = 0.f;
      for (float v : part) amax = std::max(amax, v);
      // torch evaluates `127.0 / t` as `t.reciprocal() * 127`; the same two roundings keep codes identical.
      const float scale = (1.0f / std::max(amax, 1e-5f)) * 127.0f;
      int8_t* out = a.codes.data() + t * padded_k;
      for (i = 0; i < k; ++i) {
        // Round half to even like torch.round: adding and subtracting 1.5 * 2^23 leaves the rounded value (exact
        // for |v| < 2^22; here |v| <= ~127.5), and unlike nearbyint it vectorizes without SSE4.1.
        const float v = static_cast<float>(row[i]) * scale;
        float c = (v + 12582912.0f) - 12582912.0f;
        c = std::min(127.f, std::max(-128.f, c));
        out[i] = static_cast<int8_t>(c);
      }
      a.scales[t] = scale;
    }
  });
}

struct Problem {
  const uint8_t* w;        // (rows, row_bytes)
  const float* w_scale;    // (rows, groups)
  const Activations* act;
  int64_t rows, row_bytes, padded_k, groups, blocks_per_group, tokens;
  int bits;
  float* y;                // (tokens, rows)

  int64_t blocks() const { return row_bytes / kBlockBytes; }
  // Block range of group g; the last group also takes the zero-padded tail blocks.
  int64_t group_end(int64_t g) const { return g + 1 == groups ? blocks() : (g + 1) * blocks_per_group; }
  // Integer dot of one group -> signed dot, given sum(q * x) over it and sum(x) of the whole row.
  static int64_t signed_dot(int bits, int64_t qx, int64_t xsum) { return bits == 2 ? qx - xsum : 2 * qx - xsum; }
};

// The float epilogue shared by every path: y = sum_g(dot_g * w_scale[g]) / x_scale. Always inlined, so the SIMD
// paths run it VEX-encoded: an out-of-line SSE copy called after 256-bit code cost 25% of the AVX2 decode time.
// Only group sums are computed by the paths; sum(x) is subtracted per group with the group's own x sum.
__attribute__((always_inline)) inline void finish_row(const Problem& p, int64_t n, int64_t t, const int32_t* qx_per_group,
                       const int32_t* xsum_per_group) {
  const float* ws = p.w_scale + n * p.groups;
  float acc = 0.f;
  for (int64_t g = 0; g < p.groups; ++g)
    acc += static_cast<float>(Problem::signed_dot(p.bits, qx_per_group[g], xsum_per_group[g])) * ws[g];
  p.y[t * p.rows + n] = acc / p.act->scales[t];
}

// Per token, per group sums of x codes (needed for the q/b -> code correction when groups > 1).
std::vector<int32_t> group_xsums(const Problem& p) {
  std::vector<int32_t> out(p.tokens * p.groups, 0);
  const int64_t values_per_block = kBlockBytes * (8 / p.bits);
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int8_t* x = p.act->codes.data() + t * p.padded_k;
    for (int64_t g = 0; g < p.groups; ++g) {
      int32_t s = 0;
      for (int64_t i = g * p.blocks_per_group * values_per_block; i < p.group_end(g) * values_per_block; ++i) s += x[i];
      out[t * p.groups + g] = s;
    }
  }
  return out;
}

// ---------------------------------------------------------------- portable
void rows_portable(const Problem& p, const int32_t* xsums, int64_t n0, int64_t n1) {
  const int planes = 8 / p.bits;
  const int mask = (1 << p.bits) - 1;
  std::vector<int32_t> qx(p.groups);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = p.w + n * p.row_bytes;
    for (int64_t t = 0; t < p.tokens; ++t) {
      const int8_t* x = p.act->codes.data() + t * p.padded_k;
      for (int64_t g = 0; g < p.groups; ++g) {
        int32_t s = 0;
        for (int64_t b = g * p.blocks_per_group; b < p.group_end(g); ++b) {
          const uint8_t* wb = wrow + b * kBlockBytes;
          const int8_t* xb = x + b * kBlockBytes * planes;
          for (int plane = 0; plane < planes; ++plane)
            for (int j = 0; j < kBlockBytes; ++j)
              s += ((wb[j] >> (plane * p.bits)) & mask) * xb[plane * kBlockBytes + j];
        }
        qx[g] = s;
      }
      finish_row(p, n, t, qx.data(), xsums + t * p.groups);
    }
  }
}

#ifdef QAT_X86
// ---------------------------------------------------------------- AVX2 / AVX-512 VNNI tiles
// A tile is RR rows x TT tokens: each weight block is loaded and unpacked once per tile and each activation
// vector once per plane, so decode (TT = 1) shares activation loads across 4 rows and prefill (TT = 4) shares
// the unpacking across 4 tokens.
__attribute__((target("avx2,fma"))) inline int32_t hsum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Decode on AVX2 (RR rows x 1 token). AVX2 has no u8 x s8 -> s32 dot, so products go through vpmaddubsw into
// int16 lanes. To spend one shift per two planes (not one per plane), planes are taken in pairs from
// u_i = w >> (2 * BITS * i): plane 2i is `u_i & lo` (value q), plane 2i+1 is `u_i & hi` in place (value
// q << BITS), summed in its own int16 accumulator and shifted back when widening to int32. Bounds, with
// |x| <= 128: a lane gains <= 2 * 8 * 128 = 2048 (ternary hi) or 2 * 2 * 128 = 512 (binary hi) per vpmaddubsw,
// 4 per block (ternary) or 8 (binary), so widening every kChunkBlocks = 2 blocks stays <= 16384.
constexpr int64_t kChunkBlocks = 2;
constexpr int64_t kPrefetchBytes = 4096;

template <int BITS, int RR>
__attribute__((target("avx2,fma"))) void decode_avx2(const Problem& p, const int32_t* xsums, int64_t n0, int64_t t) {
  constexpr int planes = 8 / BITS;
  constexpr int pairs = planes / 2;
  const __m256i lo = _mm256_set1_epi8((1 << BITS) - 1);
  const __m256i hi = _mm256_set1_epi8(((1 << BITS) - 1) << BITS);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x = p.act->codes.data() + t * p.padded_k;
  const uint8_t* tile = p.w + n0 * p.row_bytes;
  const uint8_t* wrow[RR];
  for (int r = 0; r < RR; ++r) wrow[r] = tile + r * p.row_bytes;
  int32_t qx[RR][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[RR];
    for (int r = 0; r < RR; ++r) acc[r] = _mm256_setzero_si256();
    const int64_t b_end = p.group_end(g);
    for (int64_t b0 = g * p.blocks_per_group; b0 < b_end; b0 += kChunkBlocks) {
      const int64_t b1 = std::min(b0 + kChunkBlocks, b_end);
      __m256i s_lo[RR], s_hi[RR];
      for (int r = 0; r < RR; ++r) s_lo[r] = s_hi[r] = _mm256_setzero_si256();
      for (int64_t half = 2 * b0; half < 2 * b1; ++half) {   // 32-byte halves of 64-byte blocks
        const int8_t* xh = x + (half / 2) * planes * kBlockBytes + (half % 2) * 32;
#pragma GCC unroll 4
        for (int r = 0; r < RR; ++r) {
          // The RR rows are contiguous and consumed at the same pace: prefetch the tile's bytes as one linear
          // stream, kPrefetchBytes ahead of how far it has been read (4 short row streams defeat the hardware
          // prefetcher; measured 1.5x on streamed weights, Zen 3).
          if (((half * RR + r) & 1) == 0)
            _mm_prefetch(reinterpret_cast<const char*>(tile + (half * RR + r) * 32 + kPrefetchBytes), _MM_HINT_T0);
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + half * 32));
#pragma GCC unroll 4
          for (int i = 0; i < pairs; ++i) {
            const __m256i u = i == 0 ? w : _mm256_srli_epi16(w, 2 * BITS * i);
            const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + (2 * i) * kBlockBytes));
            const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + (2 * i + 1) * kBlockBytes));
            s_lo[r] = _mm256_add_epi16(s_lo[r], _mm256_maddubs_epi16(_mm256_and_si256(u, lo), x_lo));
            s_hi[r] = _mm256_add_epi16(s_hi[r], _mm256_maddubs_epi16(_mm256_and_si256(u, hi), x_hi));
          }
        }
      }
      // s_hi holds (q << BITS) * x sums: exact multiples of 2^BITS, so the arithmetic shift divides exactly.
      for (int r = 0; r < RR; ++r)
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(
                                              _mm256_add_epi16(s_lo[r], _mm256_srai_epi16(s_hi[r], BITS)), ones));
    }
    for (int r = 0; r < RR; ++r) qx[r][g] = hsum_avx2(acc[r]);
  }
  for (int r = 0; r < RR; ++r) finish_row(p, n0 + r, t, qx[r], xsums + t * p.groups);
}

// Prefill on AVX2: unpack row n once into bytes (`qrow`, padded_k stored values), then stream 4 tokens at a time
// over it; the inner loop is load + vpmaddubsw + add per 32 products, with no unpacking per token.
template <int BITS>
__attribute__((target("avx2,fma"))) void prefill_row_avx2(const Problem& p, const int32_t* xsums, int64_t n,
                                                         int64_t tokens, uint8_t* qrow) {
  constexpr int planes = 8 / BITS;
  const __m256i mask = _mm256_set1_epi8((1 << BITS) - 1);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wrow = p.w + n * p.row_bytes;
  for (int64_t i = 0; i < p.row_bytes; i += 32) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + i));
    const int64_t block = i / kBlockBytes, half = i % kBlockBytes;
    for (int plane = 0; plane < planes; ++plane)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qrow + (block * planes + plane) * kBlockBytes + half),
                          _mm256_and_si256(_mm256_srli_epi16(w, plane * BITS), mask));
  }
  const int64_t block_values = kBlockBytes * planes;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenTile) {
    const int8_t* x0 = p.act->codes.data() + t0 * p.padded_k;
    int32_t qx[kTokenTile][64];
    for (int64_t g = 0; g < p.groups; ++g) {
      __m256i acc[kTokenTile];
      for (int t = 0; t < kTokenTile; ++t) acc[t] = _mm256_setzero_si256();
      for (int64_t b = g * p.blocks_per_group; b < p.group_end(g); ++b) {
        __m256i s[kTokenTile];
        for (int t = 0; t < kTokenTile; ++t) s[t] = _mm256_setzero_si256();
        // int16 lanes: 2 products of |q x| <= 256 per step, 8 steps per block -> <= 4096, no saturation.
#pragma GCC unroll 1
        for (int64_t i = b * block_values; i < (b + 1) * block_values; i += 32) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + i));
          for (int t = 0; t < kTokenTile; ++t)
            s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(
                q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + t * p.padded_k + i))));
        }
        for (int t = 0; t < kTokenTile; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s[t], ones));
      }
      for (int t = 0; t < kTokenTile; ++t) qx[t][g] = hsum_avx2(acc[t]);
    }
    for (int t = 0; t < kTokenTile; ++t) finish_row(p, n, t0 + t, qx[t], xsums + (t0 + t) * p.groups);
  }
}

// vpdpbusd multiplies u8 weights by s8 activations and adds groups of 4 straight into int32 lanes.
template <int BITS, int RR, int TT>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const Problem& p, const int32_t* xsums,
                                                                       int64_t n0, int64_t t0) {
  constexpr int planes = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8((1 << BITS) - 1);
  const int8_t* x0 = p.act->codes.data() + t0 * p.padded_k;
  int32_t qx[RR][TT][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[RR][TT];
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_si512();
    for (int64_t b = g * p.blocks_per_group; b < p.group_end(g); ++b) {
      __m512i w[RR];
      for (int r = 0; r < RR; ++r) {
        const uint8_t* wb = p.w + (n0 + r) * p.row_bytes + b * kBlockBytes;
        _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * kBlockBytes), _MM_HINT_T0);
        w[r] = _mm512_loadu_si512(wb);
      }
#pragma GCC unroll 8
      for (int plane = 0; plane < planes; ++plane) {
        __m512i q[RR];
        for (int r = 0; r < RR; ++r) q[r] = _mm512_and_si512(_mm512_srli_epi16(w[r], plane * BITS), mask);
        for (int t = 0; t < TT; ++t) {
          const __m512i xv = _mm512_loadu_si512(x0 + t * p.padded_k + (b * planes + plane) * kBlockBytes);
          for (int r = 0; r < RR; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], q[r], xv);
        }
      }
    }
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < TT; ++t) qx[r][t][g] = _mm512_reduce_add_epi32(acc[r][t]);
  }
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < TT; ++t) finish_row(p, n0 + r, t0 + t, qx[r][t], xsums + (t0 + t) * p.groups);
}

template <int BITS, int RR, int TT, bool AVX512>
inline void tile(const Problem& p, const int32_t* xsums, int64_t n0, int64_t t0) {
  if constexpr (AVX512) tile_avx512<BITS, RR, TT>(p, xsums, n0, t0);
  else decode_avx2<BITS, RR>(p, xsums, n0, t0);
}

template <int BITS, bool AVX512>
void rows_simd(const Problem& p, const int32_t* xsums, int64_t n0, int64_t n1) {
  constexpr int kRowTile = 4;
  const int64_t tiled_tokens = p.tokens - p.tokens % kTokenTile;
  if (tiled_tokens > 0 && AVX512) {
    // Prefill: 1 row x 4 tokens, row-major so a row's blocks stay in L1 across token tiles.
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t t = 0; t < tiled_tokens; t += kTokenTile) tile<BITS, 1, kTokenTile, AVX512>(p, xsums, n, t);
  } else if (tiled_tokens > 0) {
    std::vector<uint8_t> qrow(p.padded_k);
    for (int64_t n = n0; n < n1; ++n) prefill_row_avx2<BITS>(p, xsums, n, tiled_tokens, qrow.data());
  }
  for (int64_t t = tiled_tokens; t < p.tokens; ++t) {     // decode and token tails: 4 rows x 1 token
    int64_t n = n0;
    for (; n + kRowTile <= n1; n += kRowTile) tile<BITS, kRowTile, 1, AVX512>(p, xsums, n, t);
    for (; n < n1; ++n) tile<BITS, 1, 1, AVX512>(p, xsums, n, t);
  }
}
#endif  // QAT_X86

bool cpu_has(const std::string& path) {
#ifdef QAT_X86
  __builtin_cpu_init();
  if (path == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == "avx512_vnni")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#endif
  return path == "portable";
}

// Unpack rows [n0, n1) to int8 codes (rows, padded_k) for the at::_int_mm path.
void unpack_rows_int8(const Problem& p, int8_t* out, int64_t n0, int64_t n1) {
  const int planes = 8 / p.bits;
  const int mask = (1 << p.bits) - 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = p.w + n * p.row_bytes;
    int8_t* o = out + n * p.padded_k;
    for (int64_t b = 0; b < p.blocks(); ++b)
      for (int plane = 0; plane < planes; ++plane)
        for (int j = 0; j < kBlockBytes; ++j) {
          const int v = (wrow[b * kBlockBytes + j] >> (plane * p.bits)) & mask;
          o[(b * planes + plane) * kBlockBytes + j] = static_cast<int8_t>(p.bits == 2 ? v - 1 : 2 * v - 1);
        }
  }
}

// Writes y (tokens, out_features) float32 into `out`; every element is written by every path.
void packed_linear_out(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale, int64_t bits,
                       int64_t in_features, int64_t group_size, const std::string& path, at::Tensor out) {
  TORCH_CHECK(bits == 1 || bits == 2, "packed_linear: bits must be 1 (binary) or 2 (ternary), got ", bits);
  TORCH_CHECK(x.size(-1) == in_features, "packed_linear: input has ", x.size(-1), " features, layer expects ",
              in_features);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed_linear: packed weight must be a contiguous 2-D uint8 tensor");
  const int64_t values_per_block = kBlockBytes * (8 / bits);
  const int64_t row_bytes = packed.size(1);
  const int64_t padded_k = row_bytes * (8 / bits);
  TORCH_CHECK(row_bytes % kBlockBytes == 0 && padded_k >= in_features && padded_k - in_features < values_per_block,
              "packed_linear: packed row of ", row_bytes, " bytes does not hold in_features=", in_features);
  const int64_t rows = packed.size(0);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 2 && w_scale.size(0) == rows &&
                  w_scale.is_contiguous(),
              "packed_linear: scale must be contiguous float32 (out_features, groups)");
  const int64_t groups = w_scale.size(1);
  TORCH_CHECK(groups == 1 || (group_size % values_per_block == 0 && groups * group_size == in_features),
              "packed_linear: group_size=", group_size, " must be a multiple of ", values_per_block,
              " with groups * group_size == in_features");
  TORCH_CHECK(groups <= 64, "packed_linear: at most 64 groups per row, got ", groups);
  TORCH_CHECK(path == "avx512_vnni" || path == "avx2" || path == "portable",
              "packed_linear: unknown path '", path, "'");
  TORCH_CHECK(cpu_has(path), "packed_linear: this CPU cannot run the '", path, "' path");

  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  const int64_t tokens = x2.size(0);
  Activations act;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "quantize_tokens", [&] {
    quantize_tokens<scalar_t>(x2.data_ptr<scalar_t>(), tokens, in_features, padded_k, act);
  });

  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == tokens * rows,
              "packed_linear: out must be a contiguous float32 tensor of ", tokens, " x ", rows, " elements");
  Problem p{packed.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), &act, rows, row_bytes, padded_k, groups,
            groups == 1 ? row_bytes / kBlockBytes : group_size / values_per_block, tokens, static_cast<int>(bits),
            out.data_ptr<float>()};

  // Part of the avx512_vnni path: oneDNN's int8 GEMM is fast only with VNNI/AMX; on AVX2-only CPUs it is a
  // slow reference loop and the tiled kernel below wins at every batch size.
  if (path == "avx512_vnni" && tokens >= kIntMmMinTokens && groups == 1) {
    // Prefill: compute-bound, so unpack once and let oneDNN's int8 GEMM (AMX/VNNI) do the products.
    at::Tensor w8 = at::empty({rows, padded_k}, packed.options().dtype(at::kChar));
    at::parallel_for(0, rows, 16, [&](int64_t n0, int64_t n1) { unpack_rows_int8(p, w8.data_ptr<int8_t>(), n0, n1); });
    at::Tensor xq = at::from_blob(act.codes.data(), {tokens, padded_k}, at::kChar);
    at::Tensor acc = at::_int_mm(xq, w8.t());
    at::Tensor xs = at::from_blob(act.scales.data(), {tokens, 1}, at::kFloat);
    out.view({tokens, rows}).copy_(acc.to(at::kFloat).mul_(w_scale.reshape({1, rows})).div_(xs));
  } else {
    const std::vector<int32_t> xsums = group_xsums(p);
    const int32_t* xs = xsums.data();
    at::parallel_for(0, rows, 8, [&](int64_t n0, int64_t n1) {
#ifdef QAT_X86
      if (path == "avx512_vnni") {
        bits == 2 ? rows_simd<2, true>(p, xs, n0, n1) : rows_simd<1, true>(p, xs, n0, n1);
        return;
      }
      if (path == "avx2") {
        bits == 2 ? rows_simd<2, false>(p, xs, n0, n1) : rows_simd<1, false>(p, xs, n0, n1);
        return;
      }
#endif
      rows_portable(p, xs, n0, n1);
    });
  }
}

bool cpu_supports(const std::string& path) { return cpu_has(path); }

}  // namespace

TORCH_LIBRARY(qat_kernels, m) {
  m.def("packed_linear_out(Tensor x, Tensor packed, Tensor scale, int bits, int in_features, int group_size, "
        "str path, Tensor(a!) out) -> ()");
  m.def("cpu_supports(str path) -> bool", &cpu_supports);
}

TORCH_LIBRARY_IMPL(qat_kernels, CPU, m) { m.impl("packed_linear_out", &packed_linear_out); }
