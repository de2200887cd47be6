// Packed low-bit linear layer on CPU: y = (x_codes . w_codes) * w_scale / x_scale.
//
// Weight layouts (qat/pack/kernel_layout.py):
// - ternary: per row, blocks of 64 bytes; element e = 64 * plane + byte of a block sits in byte `byte`, bits
//   [2 plane, 2 plane + 2), stored as q = code + 1 in {0, 1, 2}. One shift + mask turns a plane into 64 (or 2 x 32)
//   unsigned bytes that line up with 64 contiguous int8 activations (the I2_S / TQ2_0 idea, widened so AVX-512
//   and AVX2 read the same layout): u8 x s8 products, then sum(code * x) = sum(q * x) - sum(x).
// - binary: rows in tiles of 32; per tile and input byte c (columns 8c..8c+7, bit i = column 8c + i, 1 for +1),
//   the 32 rows' bytes are stored together. A 32-byte load holds one 4-column group (a nibble) of 32 rows, so
//   decode is a table lookup (T-MAC): per token, the 16 signed sums +-x0 +-x1 +-x2 +-x3 of every 4 activations
//   are tabulated in two 16-byte tables (exact: low and high nibble sums of byte-offset terms on AVX2, low and high
//   bytes of int16 on AVX-512 VBMI); vpshufb (vpermb) looks up 32 rows at once. ~1 shuffle per 64 weights on AVX2,
//   where bit planes take 4 vpmaddubsw (and their masks and adds) per 128 weights: 2.2x on Zen 3 at the time.
//
// Activations are quantized here, per token, with the formula of qat/quant/activation.py
// (scale = 127 / max(max|x|, 1e-5), codes = round-half-even(x * scale) clamped to [-127, 127]: a finite input gives
// |x * scale| <= 127, so this is torch's int8 clamp for it; a NaN input, skipped by the max, or an infinite one
// (scale 0, product NaN) gets -127, which the AVX2 binary tables hold (code + 127 must fit a byte)), zero-padded to
// whole blocks so the kernels have no tails. Integer sums are exact; the float epilogue rounds once per group and
// once for the division, identically in every path.
//
// Paths (chosen at run time, forced by name from Python via QAT_KERNEL_PATH): "avx512_vnni" (decode, 1 token:
// ternary vpdpbusd on 64-byte blocks without shifts, binary the table lookup by vpermb where the CPU has VBMI
// (else AVX2's), both reading several rows (tiles) far apart at once to keep the memory busy; from kGemmMinTokens tokens
// on, a VNNI GEMM: rows unpacked once to bytes in L1/L2, a 4-row x 6-token register tile of vpdpbusd; on CPUs with
// AMX-INT8, from kIntMmMinTokens tokens on, unpack to int8 and at::_int_mm, i.e. oneDNN on AMX tiles), "avx2"
// (ternary: vpmaddubsw + vpmaddwd; binary: table lookup), "portable" (plain C++ over the layouts' definition). AVX2
// prefill (ternary 2+ tokens, binary above kLutMaxTokens) unpacks 4 rows (a binary tile) to bytes once and runs a
// 4-row x 2-token register tile of vpmaddubsw over them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/python.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define QAT_X86 1
#endif

namespace {

constexpr int64_t kBlockBytes = 64;
constexpr int64_t kIntMmMinTokens = 32;  // AMX CPUs: from this batch on, unpack to int8 and use at::_int_mm
constexpr int64_t kBinaryTile = 32;      // rows per binary tile
// Binary AVX2: up to this batch every token by table lookup, above it the unpacked-tile GEMM. The lookup's cost grows
// by token as the GEMM's does, and it ran 1.7-2.0x torch int8 at batch 16 and 64 where the GEMM ran 0.7-0.9x (Zen 3,
// 2 threads, 4096x4096 and 4096x11008); the bound keeps its tables (8 bytes per input and token, all built before
// the lookups) to ~22 MB at in_features 11008.
constexpr int64_t kLutMaxTokens = 256;

// Binary AVX2 path: first token run by table lookup (earlier ones go through the unpacked-tile GEMM): all or none.
inline int64_t first_lut_token(int64_t tokens) { return tokens <= kLutMaxTokens ? 0 : tokens; }
constexpr int64_t kLutBytes = 32;        // tables per 4-column group: int16 bytes (VBMI), nibble sums (AVX2)

// Tile position of row r of a binary tile (inverse of BINARY_TILE_ROWS in kernel_layout.py).
inline int binary_tile_pos(int64_t r) { return static_cast<int>(r < 8 ? r : r < 16 ? r + 8 : r < 24 ? r - 8 : r); }

// 64-byte aligned storage: a 512-bit load of codes or tables that straddles two cache lines costs two (malloc's
// 16-byte alignment made the batched GEMM ~35% slower in some processes, depending on where the heap put the codes).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  // resize() leaves trivial elements uninitialized: every byte is written before it is read, and zeroing 32 KiB of
  // tables per call was a measurable part of a decode matmul's fixed cost.
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

struct Activations {
  std::vector<int8_t, CacheLineAllocator<int8_t>> codes;   // (tokens, padded_k), zero-padded
  // The codes of whole groups of kGroupTokens tokens interleaved per 32 columns, for the AVX2 ternary 1 x 8 tile
  // (built only when that tile runs): token t of a group, columns 32 j .. 32 j + 31 at (j * 8 + t) * 32 of the group.
  std::vector<int8_t, CacheLineAllocator<int8_t>> codes8;
  std::vector<float> scales;   // 127 / max|x| per token
};

// Round half to even like torch.round: adding and subtracting 1.5 * 2^23 leaves the rounded value (exact for
// |v| < 2^22; here |v| <= ~127.5), and unlike nearbyint it vectorizes without SSE4.1.
constexpr float kRoundMagic = 12582912.0f;

#ifdef QAT_X86
// One fp32 token on AVX2: the scalar loop's operations, in its order and NaN handling (a NaN input is skipped by
// the max, as std::max(part, |x|) skips it, and clamps to -127), 8 lanes at a time: the scalar loop ran at
// ~1.5 ns per value, ~6 us of a 4096-wide decode matmul.
__attribute__((target("avx2,fma"))) float quantize_row_avx2(const float* row, int64_t k, int8_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // Four running maxima: one is a serial chain of 4-cycle maxps (~0.7 us of 4096 values).
  __m256 m4[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= k; i += 32)
    for (int j = 0; j < 4; ++j) m4[j] = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(row + i + 8 * j)), m4[j]);
  __m256 m = _mm256_max_ps(_mm256_max_ps(m4[0], m4[1]), _mm256_max_ps(m4[2], m4[3]));
  for (; i + 8 <= k; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(row + i)), m);
  alignas(32) float part[8];
  _mm256_store_ps(part, m);
  float amax = 0.f;
  for (float v : part) amax = std::max(amax, v);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
  const float scale = (1.0f / std::max(amax, 1e-5f)) * 127.0f;
  const __m256 vs = _mm256_set1_ps(scale), magic = _mm256_set1_ps(kRoundMagic);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (i = 0; i + 32 <= k; i += 32) {
    __m256i c[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + i + 8 * j), vs);
      const __m256 r = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
      c[j] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    // packs work per 128-bit lane: [c0 0-3, c1 0-3, c2 0-3, c3 0-3 | c0 4-7, ...]; the permute restores order.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < k; ++i) {
    const float c = (row[i] * scale + kRoundMagic) - kRoundMagic;
    out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, c)));
  }
  return scale;
}
#endif

template <typename scalar_t>
void quantize_tokens(const scalar_t* x, int64_t tokens, int64_t k, int64_t padded_k, Activations& a) {
  a.codes.resize(tokens * padded_k);   // uninitialized: every code and padding byte is written below
  a.scales.assign(tokens, 0.f);
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = x + t * k;
      std::memset(a.codes.data() + t * padded_k + k, 0, padded_k - k);
#ifdef QAT_X86
      if constexpr (std::is_same_v<scalar_t, float>) {
        static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        if (avx2) {
          a.scales[t] = quantize_row_avx2(row, k, a.codes.data() + t * padded_k);
          continue;
        }
      }
#endif
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
        const float v = static_cast<float>(row[i]) * scale;
        float c = (v + kRoundMagic) - kRoundMagic;
        c = std::min(127.f, std::max(-127.f, c));
        out[i] = static_cast<int8_t>(c);
      }
      a.scales[t] = scale;
    }
  });
}

struct Problem {
  const uint8_t* w;        // ternary (rows, row_bytes); binary (tiles, row_bytes, 32)
  const float* w_scale;    // (rows, groups)
  const Activations* act;
  int64_t rows, row_bytes, padded_k, groups, blocks_per_group, tokens;
  int bits;
  float* y;                // (tokens, rows)

  int64_t blocks() const { return row_bytes / kBlockBytes; }
  int64_t values_per_block() const { return kBlockBytes * (8 / bits); }
  int64_t tiles() const { return (rows + kBinaryTile - 1) / kBinaryTile; }
  // Block range of group g; the last group also takes the zero-padded tail blocks.
  int64_t group_end(int64_t g) const { return g + 1 == groups ? blocks() : (g + 1) * blocks_per_group; }
  // Stored value of row n, column k (ternary q = code + 1, binary b = (code + 1) / 2): the layouts' definition.
  int stored(int64_t n, int64_t k) const {
    if (bits == 2) {
      const int64_t e = k % values_per_block(), byte = (k / values_per_block()) * kBlockBytes + e % kBlockBytes;
      return (w[n * row_bytes + byte] >> (2 * (e / kBlockBytes))) & 3;
    }
    return (w[((n / kBinaryTile) * row_bytes + k / 8) * kBinaryTile + binary_tile_pos(n % kBinaryTile)] >> (k % 8)) & 1;
  }
  // sum(q * x) of one group -> signed dot, given sum(x) over the group.
  int32_t signed_dot(int64_t qx, int64_t xsum) const {
    return static_cast<int32_t>(bits == 2 ? qx - xsum : 2 * qx - xsum);
  }
};

// The float epilogue shared by every path: y = sum_g(dot_g * w_scale[g]) / x_scale, from the signed integer dot of
// each group. Always inlined, so the SIMD paths run it VEX-encoded: an out-of-line SSE copy called after 256-bit
// code cost 25% of the AVX2 decode time.
__attribute__((always_inline)) inline void finish_row(const Problem& p, int64_t n, int64_t t, const int32_t* dots) {
  const float* ws = p.w_scale + n * p.groups;
  float acc = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) acc += static_cast<float>(dots[g]) * ws[g];
  p.y[t * p.rows + n] = acc / p.act->scales[t];
}

// Paths that sum unsigned stored values (q or b) per group turn them into signed dots with the group's x sums.
__attribute__((always_inline)) inline void finish_row_unsigned(const Problem& p, int64_t n, int64_t t, int32_t* qx,
                                                               const int32_t* xsum_per_group) {
  for (int64_t g = 0; g < p.groups; ++g) qx[g] = p.signed_dot(qx[g], xsum_per_group[g]);
  finish_row(p, n, t, qx);
}

// Per token, per group sums of x codes (needed for the q/b -> code correction when groups > 1).
std::vector<int32_t> group_xsums(const Problem& p) {
  std::vector<int32_t> out(p.tokens * p.groups, 0);
  const int64_t vpb = p.values_per_block();
  // In parallel over tokens: done serially, it is a fixed cost every GEMM thread waits for.
  at::parallel_for(0, p.tokens, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int8_t* x = p.act->codes.data() + t * p.padded_k;
      for (int64_t g = 0; g < p.groups; ++g) {
        int32_t s = 0;
        for (int64_t i = g * p.blocks_per_group * vpb; i < p.group_end(g) * vpb; ++i) s += x[i];
        out[t * p.groups + g] = s;
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------- portable
void rows_portable(const Problem& p, const int32_t* xsums, int64_t n0, int64_t n1) {
  const int64_t vpb = p.values_per_block();
  std::vector<int32_t> qx(p.groups);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t t = 0; t < p.tokens; ++t) {
      const int8_t* x = p.act->codes.data() + t * p.padded_k;
      for (int64_t g = 0; g < p.groups; ++g) {
        int32_t s = 0;
        for (int64_t k = g * p.blocks_per_group * vpb; k < p.group_end(g) * vpb; ++k) s += p.stored(n, k) * x[k];
        qx[g] = s;
      }
      finish_row_unsigned(p, n, t, qx.data(), xsums + t * p.groups);
    }
  }
}

// Binary tile -> stored bits as bytes in column order, one row every `stride` bytes per tile row (rows past the layer
// too).
void unpack_binary_tile(const Problem& p, int64_t tile, uint8_t* qrows, int64_t stride) {
  static const std::array<uint64_t, 256> kBitBytes = [] {   // byte -> its 8 bits as 8 bytes, bit i in byte i
    std::array<uint64_t, 256> table{};
    for (int v = 0; v < 256; ++v)
      for (int i = 0; i < 8; ++i) table[v] |= static_cast<uint64_t>((v >> i) & 1) << (8 * i);
    return table;
  }();
  const uint8_t* w = p.w + tile * p.row_bytes * kBinaryTile;
  for (int64_t r = 0; r < kBinaryTile; ++r) {
    const int pos = binary_tile_pos(r);
    uint8_t* out = qrows + r * stride;
    for (int64_t c = 0; c < p.row_bytes; ++c) std::memcpy(out + 8 * c, &kBitBytes[w[c * kBinaryTile + pos]], 8);
  }
}

#ifdef QAT_X86
// ---------------------------------------------------------------- ternary: AVX2 / AVX-512 VNNI tiles
// A tile is RR rows x TT tokens: each weight block is loaded and unpacked once per tile and each activation
// vector once per plane, so decode (TT = 1) shares activation loads across 4 rows and prefill (TT = 4) shares
// the unpacking across 4 tokens.
__attribute__((target("avx2,fma"))) inline int32_t hsum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Ternary decode on AVX2 (RR rows x 1 token). AVX2 has no u8 x s8 -> s32 dot, so products go through vpmaddubsw
// into int16 lanes. To spend one shift per two planes (not one per plane), planes are taken in pairs from
// u_i = w >> (4 * i): plane 2i is `u_i & 0x03` (value q), plane 2i+1 is `u_i & 0x0C` in place (value q << 2),
// summed in its own int16 accumulator and shifted back when widening to int32. Bounds, with |x| <= 128: a lane
// gains <= 2 * 8 * 128 = 2048 (hi) per vpmaddubsw, 4 per block, so widening every kChunkBlocks = 2 blocks stays
// <= 16384.
// The RR rows are `spread` rows apart, as in the AVX-512 decode below (4 streams in different pages, each
// prefetched kDecodePrefetchRows rows ahead): 22.4 -> 26.8 GB/s (4096x4096) and 21.8 -> 28.6 (4096x11008) streamed
// on 2 cores of a Sapphire Rapids class VM (path forced to avx2) against 4 adjacent rows read as one stream.
constexpr int64_t kChunkBlocks = 2;
constexpr int64_t kDecodePrefetchRows = 2;

// finish_row_unsigned for 4 rows `spread` apart with one group, given their unsigned sums and the token's sum of
// codes: the same IEEE operations in the same order, one division for the 4 (the scalar epilogue was ~1/6 of a tile
// at in_features 1536).
__attribute__((target("avx2"), always_inline)) inline void finish4_spread(const Problem& p, int32_t q0, int32_t q1,
                                                                            int32_t q2, int32_t q3, int32_t xsum,
                                                                            int64_t n0, int64_t spread, int64_t t) {
  const __m128i dots = _mm_setr_epi32(p.signed_dot(q0, xsum), p.signed_dot(q1, xsum), p.signed_dot(q2, xsum),
                                      p.signed_dot(q3, xsum));
  const float* ws = p.w_scale + n0;
  const __m128 acc = _mm_add_ps(_mm_setzero_ps(), _mm_mul_ps(_mm_cvtepi32_ps(dots),
                                _mm_setr_ps(ws[0], ws[spread], ws[2 * spread], ws[3 * spread])));
  alignas(16) float y[4];
  _mm_store_ps(y, _mm_div_ps(acc, _mm_set1_ps(p.act->scales[t])));
  for (int r = 0; r < 4; ++r) p.y[t * p.rows + n0 + r * spread] = y[r];
}

// The 4-row decode tile over one group's blocks [b0, b1) in assembly. GCC 12 compiled the intrinsics' loop (below,
// kept for fewer rows) with 6 of the 8 int16 accumulators on the stack (a load and a store per row and half) and the
// offsets recomputed each half, ~100 uops per 4 x 32 packed bytes whose work is 52 vector ALU uops; here the
// accumulators, both masks and the half's 4 planes of codes stay in registers, and the widening into the int32 lanes
// (`sums.acc`, every kChunkBlocks blocks) runs in the same loop. On Zen 3, where the decode was compute-bound (4096x4096
// read 18 GB/s from L3 as from memory, 2 threads): in L2, 1 thread, 1.2-1.5x; from L3 18 -> 27 GB/s; streamed, in
// turns in one process, both orders (8 rounds each, medians), 4096x4096 17.0 / 19.6 -> 17.5 / 21.7 GB/s and
// 4096x11008 17.0 / 19.6 -> 18.1 / 22.6 beside a torch sum reading 19.9 / 20.7.
struct alignas(32) DecodeSums {
  int32_t acc[4][8];   // each row's int32 lanes, at byte 32 r
  int16_t ones[16];    // at byte 128: vpmaddwd by ones adds int16 pairs into int32
};

// One row's part of a block half at byte offset `ow` (0 or 32) of the block: its 32 packed bytes, each plane masked
// out (planes 1 and 3 in place, as q << 2) and multiplied by that plane's codes (ymm10-13) into the row's int16 sums.
#define QAT_DECODE_ROW(r, ow)                                                                                     \
  "vmovdqu " #ow "(%[q" #r "],%[kw]), %%ymm14\n\t"                                                                 \
  "vpand %%ymm14, %[lo], %%ymm15\n\tvpmaddubsw %%ymm10, %%ymm15, %%ymm15\n\tvpaddw %%ymm15, %[l" #r "], %[l" #r "]\n\t" \
  "vpand %%ymm14, %[hi], %%ymm15\n\tvpmaddubsw %%ymm11, %%ymm15, %%ymm15\n\tvpaddw %%ymm15, %[h" #r "], %[h" #r "]\n\t" \
  "vpsrlw $4, %%ymm14, %%ymm14\n\t"                                                                               \
  "vpand %%ymm14, %[lo], %%ymm15\n\tvpmaddubsw %%ymm12, %%ymm15, %%ymm15\n\tvpaddw %%ymm15, %[l" #r "], %[l" #r "]\n\t" \
  "vpand %%ymm14, %[hi], %%ymm14\n\tvpmaddubsw %%ymm13, %%ymm14, %%ymm14\n\tvpaddw %%ymm14, %[h" #r "], %[h" #r "]\n\t"
// Half `ox` (0 or 32) of a block: the 4 planes' codes (64 bytes apart), then the 4 rows.
#define QAT_DECODE_HALF(ox)                                                                                       \
  "vmovdqu " #ox "(%[x]), %%ymm10\n\tvmovdqu " #ox "+64(%[x]), %%ymm11\n\t"                                        \
  "vmovdqu " #ox "+128(%[x]), %%ymm12\n\tvmovdqu " #ox "+192(%[x]), %%ymm13\n\t"                                   \
  QAT_DECODE_ROW(0, ox) QAT_DECODE_ROW(1, ox) QAT_DECODE_ROW(2, ox) QAT_DECODE_ROW(3, ox)
// Row r's int16 sums into its int32 lanes at byte `off` of sums: (s_lo + (s_hi >> 2)) pairwise by vpmaddwd, then
// both reset. s_hi holds (q << 2) * x sums, exact multiples of 4, so the arithmetic shift divides exactly.
#define QAT_DECODE_WIDEN(r, off)                                                                                  \
  "vpsraw $2, %[h" #r "], %[h" #r "]\n\tvpaddw %[h" #r "], %[l" #r "], %[l" #r "]\n\t"                                 \
  "vpmaddwd 128(%[sums]), %[l" #r "], %[l" #r "]\n\tvpaddd " #off "(%[sums]), %[l" #r "], %[l" #r "]\n\t"              \
  "vmovdqa %[l" #r "], " #off "(%[sums])\n\t"                                                                     \
  "vpxor %[l" #r "], %[l" #r "], %[l" #r "]\n\tvpxor %[h" #r "], %[h" #r "], %[h" #r "]\n\t"

// wrow: the 4 rows (equally far apart); x: the token's codes; adds each row's int32 lanes into sums.acc. One
// prefetch per row and 64-byte line, kDecodePrefetchRows rows ahead.
__attribute__((target("avx2"), always_inline)) inline void decode_group_4x1_avx2(const uint8_t* const (&wrow)[4],
                                                                               int64_t row_bytes, const int8_t* x,
                                                                               int64_t b0, int64_t b1,
                                                                               DecodeSums& sums) {
  const uint8_t* ahead0 = wrow[0] + kDecodePrefetchRows * row_bytes;
  const int64_t apart = wrow[1] - wrow[0];
  const int8_t* xb = x + b0 * 256;
  int64_t kw = b0 * kBlockBytes;
  const int64_t kw_end = b1 * kBlockBytes;
  const __m256i lo = _mm256_set1_epi8(0x03), hi = _mm256_set1_epi8(0x0C);
  __m256i s_lo[4], s_hi[4];
  asm("vpxor %[l0], %[l0], %[l0]\n\tvpxor %[l1], %[l1], %[l1]\n\tvpxor %[l2], %[l2], %[l2]\n\t"
      "vpxor %[l3], %[l3], %[l3]\n\tvpxor %[h0], %[h0], %[h0]\n\tvpxor %[h1], %[h1], %[h1]\n\t"
      "vpxor %[h2], %[h2], %[h2]\n\tvpxor %[h3], %[h3], %[h3]\n\t"
      "2:\n\t"   // a chunk: kChunkBlocks blocks (or to the group's end)
      "lea %c[chunk](%[kw]), %%r10\n\tcmp %[kw_end], %%r10\n\tcmovg %[kw_end], %%r10\n\t"
      "1:\n\t"   // a block
      "prefetcht0 (%[ahead0],%[kw])\n\tlea (%[ahead0],%[apart]), %%r11\n\tprefetcht0 (%%r11,%[kw])\n\t"
      "add %[apart], %%r11\n\tprefetcht0 (%%r11,%[kw])\n\tadd %[apart], %%r11\n\tprefetcht0 (%%r11,%[kw])\n\t"
      QAT_DECODE_HALF(0)
      QAT_DECODE_HALF(32)
      "add $256, %[x]\n\t"
      "add $64, %[kw]\n\t"
      "cmp %%r10, %[kw]\n\t"
      "jl 1b\n\t"
      QAT_DECODE_WIDEN(0, 0) QAT_DECODE_WIDEN(1, 32) QAT_DECODE_WIDEN(2, 64) QAT_DECODE_WIDEN(3, 96)
      "cmp %[kw_end], %[kw]\n\t"
      "jl 2b"
      : [kw] "+r"(kw), [x] "+r"(xb), [l0] "=&x"(s_lo[0]), [l1] "=&x"(s_lo[1]), [l2] "=&x"(s_lo[2]),
        [l3] "=&x"(s_lo[3]), [h0] "=&x"(s_hi[0]), [h1] "=&x"(s_hi[1]), [h2] "=&x"(s_hi[2]), [h3] "=&x"(s_hi[3])
      : [q0] "r"(wrow[0]), [q1] "r"(wrow[1]), [q2] "r"(wrow[2]), [q3] "r"(wrow[3]), [ahead0] "r"(ahead0),
        [apart] "r"(apart), [kw_end] "r"(kw_end), [lo] "x"(lo), [hi] "x"(hi), [sums] "r"(&sums),
        [chunk] "i"(kChunkBlocks * kBlockBytes)
      : "cc", "memory", "r10", "r11", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

template <int RR>
__attribute__((target("avx2,fma"))) void decode_ternary_avx2(const Problem& p, const int32_t* xsums, int64_t n0,
                                                            int64_t spread, int64_t t) {
  constexpr int kBits = 2, planes = 4, pairs = 2;
  const __m256i lo = _mm256_set1_epi8(0x03);
  const __m256i hi = _mm256_set1_epi8(0x0C);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x = p.act->codes.data() + t * p.padded_k;
  const uint8_t* wrow[RR];
  for (int r = 0; r < RR; ++r) wrow[r] = p.w + (n0 + r * spread) * p.row_bytes;
  int32_t qx[RR][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t b_end = p.group_end(g);
    if constexpr (RR == 4) {
      DecodeSums sums;
      for (int r = 0; r < RR; ++r) _mm256_store_si256(reinterpret_cast<__m256i*>(sums.acc[r]), _mm256_setzero_si256());
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums.ones), ones);
      decode_group_4x1_avx2(wrow, p.row_bytes, x, g * p.blocks_per_group, b_end, sums);
      for (int r = 0; r < RR; ++r)
        qx[r][g] = hsum_avx2(_mm256_load_si256(reinterpret_cast<const __m256i*>(sums.acc[r])));
      continue;
    }
    __m256i acc[RR];
    for (int r = 0; r < RR; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t b0 = g * p.blocks_per_group; b0 < b_end; b0 += kChunkBlocks) {
      const int64_t b1 = std::min(b0 + kChunkBlocks, b_end);
      __m256i s_lo[RR], s_hi[RR];
      for (int r = 0; r < RR; ++r) s_lo[r] = s_hi[r] = _mm256_setzero_si256();
      for (int64_t half = 2 * b0; half < 2 * b1; ++half) {   // 32-byte halves of 64-byte blocks
        const int8_t* xh = x + (half / 2) * planes * kBlockBytes + (half % 2) * 32;
#pragma GCC unroll 4
        for (int r = 0; r < RR; ++r) {
          if ((half & 1) == 0)   // one prefetch per 64-byte line, kDecodePrefetchRows rows ahead
            _mm_prefetch(reinterpret_cast<const char*>(wrow[r] + half * 32 + kDecodePrefetchRows * p.row_bytes),
                         _MM_HINT_T0);
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + half * 32));
#pragma GCC unroll 2
          for (int i = 0; i < pairs; ++i) {
            const __m256i u = i == 0 ? w : _mm256_srli_epi16(w, 2 * kBits * i);
            const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + (2 * i) * kBlockBytes));
            const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + (2 * i + 1) * kBlockBytes));
            s_lo[r] = _mm256_add_epi16(s_lo[r], _mm256_maddubs_epi16(_mm256_and_si256(u, lo), x_lo));
            s_hi[r] = _mm256_add_epi16(s_hi[r], _mm256_maddubs_epi16(_mm256_and_si256(u, hi), x_hi));
          }
        }
      }
      // s_hi holds (q << 2) * x sums: exact multiples of 4, so the arithmetic shift divides exactly.
      for (int r = 0; r < RR; ++r)
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(
                                              _mm256_add_epi16(s_lo[r], _mm256_srai_epi16(s_hi[r], kBits)), ones));
    }
    for (int r = 0; r < RR; ++r) qx[r][g] = hsum_avx2(acc[r]);
  }
  if constexpr (RR == 4) {
    if (p.groups == 1) return finish4_spread(p, qx[0][0], qx[1][0], qx[2][0], qx[3][0], xsums[t], n0, spread, t);
  }
  for (int r = 0; r < RR; ++r) finish_row_unsigned(p, n0 + r * spread, t, qx[r], xsums + t * p.groups);
}

// Prefill on AVX2 (2+ tokens): a register tile of RR unpacked rows (stored values as bytes, `stride` apart) x TT
// tokens: per 32 columns RR + TT loads and RR * TT vpmaddubsw + add into int16 lanes, so each activation load serves
// RR rows and each weight load TT tokens (one row x 4 tokens re-read every token's codes from L2 per row, which
// bounded it). int16 lanes: a vpmaddubsw adds <= 2 * 2 * 128 = 512 (ternary; binary 256), so they are widened to
// int32 every kPrefillChunk columns (32 steps).
constexpr int kPrefillRows = 4;
constexpr int kPrefillTokens = 2;   // 8 int16 accumulators + 4 weight vectors + 1 activation of the 16 ymm registers
constexpr int64_t kPrefillChunk = 1024;
// Unpacked rows sit this far past padded_k apart: at a multiple of 4 KiB, one column of every row would fall in one
// L1 set (4K aliasing).
constexpr int64_t kPrefillStridePad = 64;

// One token's part of the 4 x 2 tile's step: its 32 codes (at the memory operand x), times the 4 row vectors in
// ymm10-13, added into the token's int16 accumulators.
#define QAT_TILE_TOKEN(x, t)                                                                                      \
  "vmovdqu " x ", %%ymm14\n\t"                                                                                    \
  "vpmaddubsw %%ymm14, %%ymm10, %%ymm15\n\tvpaddw %%ymm15, %[s0" t "], %[s0" t "]\n\t"                            \
  "vpmaddubsw %%ymm14, %%ymm11, %%ymm15\n\tvpaddw %%ymm15, %[s1" t "], %[s1" t "]\n\t"                            \
  "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\tvpaddw %%ymm15, %[s2" t "], %[s2" t "]\n\t"                            \
  "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\tvpaddw %%ymm15, %[s3" t "], %[s3" t "]\n\t"

// The prefill tile's inner loop for RR = 4 rows, TT = 2 tokens: s[r][t] += vpmaddubsw(row r, token t) over columns
// [k, k_end) (k < k_end, steps of 32), rows `stride` apart from qrows, tokens `x_stride` apart from x. In assembly:
// GCC 12 compiled the intrinsics into 10 loads a step (two rows loaded twice), an accumulator spill and 8 register
// copies, ~38 uops for 8 vpmaddubsw, so Zen 3's front end (6 a cycle) bound the tile below its two multiply pipes;
// here a step is 6 loads, 8 vpmaddubsw, 8 vpaddw and the loop's 3. Measured side by side on Zen 3 (2 threads,
// weights streamed, 4096x4096 and 4096x11008): ternary batch 8 0.75-1.06x -> 0.92-1.28x, batch 64 0.84-1.07x ->
// 1.07-1.28x torch int8 dynamic.
__attribute__((target("avx2"), always_inline)) inline void prefill_steps_4x2_avx2(const uint8_t* qrows, int64_t stride,
                                                                                const int8_t* x, int64_t x_stride,
                                                                                int64_t k, int64_t k_end,
                                                                                __m256i (&s)[4][2]) {
  const uint8_t *q0 = qrows, *q1 = qrows + stride, *q2 = qrows + 2 * stride, *q3 = qrows + 3 * stride;
  asm("1:\n\t"
      "vmovdqu (%[q0],%[k]), %%ymm10\n\t"
      "vmovdqu (%[q1],%[k]), %%ymm11\n\t"
      "vmovdqu (%[q2],%[k]), %%ymm12\n\t"
      "vmovdqu (%[q3],%[k]), %%ymm13\n\t"
      QAT_TILE_TOKEN("(%[xa],%[k])", "0")
      QAT_TILE_TOKEN("(%[xb],%[k])", "1")
      "add $32, %[k]\n\t"
      "cmp %[k1], %[k]\n\t"
      "jl 1b"
      : [k] "+r"(k), [s00] "+x"(s[0][0]), [s10] "+x"(s[1][0]), [s20] "+x"(s[2][0]), [s30] "+x"(s[3][0]),
        [s01] "+x"(s[0][1]), [s11] "+x"(s[1][1]), [s21] "+x"(s[2][1]), [s31] "+x"(s[3][1])
      : [q0] "r"(q0), [q1] "r"(q1), [q2] "r"(q2), [q3] "r"(q3), [xa] "r"(x), [xb] "r"(x + x_stride), [k1] "r"(k_end)
      : "cc", "memory", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

// A step of the packed tile: row r's vector is plane (shift / 2) of its packed bytes at offset ow (plane 0: the
// mask alone), then both tokens' codes at offset ox.
#define QAT_PACKED_ROW(r, ow, shift)                                                                              \
  "vmovdqu " #ow "(%[q" #r "],%[kw]), %%ymm1" #r "\n\tvpsrlw $" #shift ", %%ymm1" #r ", %%ymm1" #r                   \
  "\n\tvpand %%ymm1" #r ", %[mask], %%ymm1" #r "\n\t"
#define QAT_PACKED_STEP(ow, ox, shift)                                                                            \
  QAT_PACKED_ROW(0, ow, shift) QAT_PACKED_ROW(1, ow, shift) QAT_PACKED_ROW(2, ow, shift)                          \
  QAT_PACKED_ROW(3, ow, shift) QAT_TILE_TOKEN(#ox "(%[xa])", "0") QAT_TILE_TOKEN(#ox "(%[xb])", "1")
#define QAT_PACKED_STEP0(ow, ox)                                                                                  \
  "vpand " #ow "(%[q0],%[kw]), %[mask], %%ymm10\n\tvpand " #ow "(%[q1],%[kw]), %[mask], %%ymm11\n\t"               \
  "vpand " #ow "(%[q2],%[kw]), %[mask], %%ymm12\n\tvpand " #ow "(%[q3],%[kw]), %[mask], %%ymm13\n\t"               \
  QAT_TILE_TOKEN(#ox "(%[xa])", "0") QAT_TILE_TOKEN(#ox "(%[xb])", "1")

// The 8 steps of one 64-byte block of a packed ternary row (column 256 b + 64 p + i is bits 2p..2p+1 of byte
// 64 b + i): plane p's two 32-byte halves in column order, the activations `dx` bytes a step; step0 takes plane 0
// (no shift), step(ow, ox, shift) the others.
#define QAT_PACKED_BLOCK(step0, step, dx)                                                                         \
  step0(0, 0) step0(32, dx) step(0, 2 * dx, 2) step(32, 3 * dx, 2) step(0, 4 * dx, 4) step(32, 5 * dx, 4)       \
  step(0, 6 * dx, 6) step(32, 7 * dx, 6)

// prefill_steps_4x2_avx2 reading the ternary rows packed (4 values a byte, qat/pack's block layout: column
// 256 b + 64 p + i is bits 2p..2p+1 of byte 64 b + i) instead of unpacked: each row vector is a load, a shift (AVX2's
// vpsrlw has no memory form) and a mask of the packed bytes, up to 8 ALU uops a step beside the 8 vpmaddubsw on Zen
// 3's two multiply pipes, and no unpack pass (~22% of a batch-8 matmul's time by perf: 4 stores per 32 packed bytes,
// and the unpacked rows took 4 KiB of L1 each). Blocks [block, block_end), 8 steps each; x advances 256 columns a
// block.
__attribute__((target("avx2"), always_inline)) inline void prefill_packed_steps_4x2_avx2(
    const uint8_t* wrows, int64_t row_bytes, const int8_t* x, int64_t x_stride, int64_t block, int64_t block_end,
    __m256i (&s)[4][2]) {
  const uint8_t *q0 = wrows, *q1 = wrows + row_bytes, *q2 = wrows + 2 * row_bytes, *q3 = wrows + 3 * row_bytes;
  const int8_t* xa = x + block * 256;
  const int8_t* xb = xa + x_stride;
  int64_t kw = block * kBlockBytes;
  const int64_t kw_end = block_end * kBlockBytes;
  const __m256i mask = _mm256_set1_epi8(0x03);
  asm("1:\n\t"
      QAT_PACKED_BLOCK(QAT_PACKED_STEP0, QAT_PACKED_STEP, 32)
      "add $256, %[xa]\n\t"
      "add $256, %[xb]\n\t"
      "add $64, %[kw]\n\t"
      "cmp %[kw_end], %[kw]\n\t"
      "jl 1b"
      : [kw] "+r"(kw), [xa] "+r"(xa), [xb] "+r"(xb), [s00] "+x"(s[0][0]), [s10] "+x"(s[1][0]),
        [s20] "+x"(s[2][0]), [s30] "+x"(s[3][0]), [s01] "+x"(s[0][1]), [s11] "+x"(s[1][1]), [s21] "+x"(s[2][1]),
        [s31] "+x"(s[3][1])
      : [q0] "r"(q0), [q1] "r"(q1), [q2] "r"(q2), [q3] "r"(q3), [kw_end] "r"(kw_end), [mask] "x"(mask)
      : "cc", "memory", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

// 8 tokens' codes interleaved per 32 columns (Activations::codes8): step j of token group g holds token t's columns
// 32 j .. 32 j + 31 at byte (g * steps + j) * 256 + 32 t, so the 1 x 8 tile below reads one stream.
constexpr int64_t kGroupTokens = 8;

// Fills a.codes8 from a.codes: whole groups of kGroupTokens tokens (a copy of 8 x padded_k bytes per group).
void interleave_token_groups(Activations& a, int64_t tokens, int64_t padded_k) {
  const int64_t groups = tokens / kGroupTokens, steps = padded_k / 32;
  a.codes8.resize(groups * kGroupTokens * padded_k);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t t = 0; t < kGroupTokens; ++t)
        for (int64_t j = 0; j < steps; ++j)
          std::memcpy(a.codes8.data() + ((g * steps + j) * kGroupTokens + t) * 32,
                      a.codes.data() + (g * kGroupTokens + t) * padded_k + 32 * j, 32);
  });
}

// One step of the 1 x 8 packed tile: the row vector in ymm13 times the 8 tokens' codes at ox (memory operands),
// added into the 8 tokens' int16 accumulators.
#define QAT_GROUP_TOKEN(ox, t, tmp)                                                                               \
  "vpmaddubsw " #ox "+32*" #t "(%[x]), %%ymm13, %%" tmp "\n\tvpaddw %%" tmp ", %[s" #t "], %[s" #t "]\n\t"
#define QAT_GROUP_TOKENS(ox)                                                                                      \
  QAT_GROUP_TOKEN(ox, 0, "ymm14") QAT_GROUP_TOKEN(ox, 1, "ymm15") QAT_GROUP_TOKEN(ox, 2, "ymm14")               \
  QAT_GROUP_TOKEN(ox, 3, "ymm15") QAT_GROUP_TOKEN(ox, 4, "ymm14") QAT_GROUP_TOKEN(ox, 5, "ymm15")               \
  QAT_GROUP_TOKEN(ox, 6, "ymm14") QAT_GROUP_TOKEN(ox, 7, "ymm15")
#define QAT_GROUP_STEP(ow, ox, shift)                                                                             \
  "vmovdqu " #ow "(%[q]), %%ymm13\n\tvpsrlw $" #shift ", %%ymm13, %%ymm13\n\tvpand %%ymm13, %[mask], %%ymm13\n\t"  \
  QAT_GROUP_TOKENS(ox)
#define QAT_GROUP_STEP0(ow, ox) "vpand " #ow "(%[q]), %[mask], %%ymm13\n\t" QAT_GROUP_TOKENS(ox)

// One packed ternary row x 8 tokens over `blocks` blocks from q (x: the tokens' interleaved codes of those
// columns): s[t] += vpmaddubsw(row, token t). Per step the row vector is unpacked once (load, shift, mask) for 8
// vpmaddubsw, where the 4 x 2 tile unpacks 4 rows for 8: 18 vector ALU uops a step instead of 24 on Zen 3's 4 vector
// pipes (vpmaddubsw issues on 2 of them: 6 G/s a core alone, vpaddw 12 G/s), and the codes are memory operands
// (L1: the caller walks K in chunks that every row of a block reuses). In L1, 1.23-1.46x the 4 x 2 tile's rate; in
// the matmul (turns, Zen 3, 2 threads, weights streamed; 4096x4096, 4096x11008, 1536x8192), times torch int8
// dynamic: batch 8 1.53-1.68x vs 1.33-1.54x, batch 16 1.48-1.68x vs 1.17-1.58x.
__attribute__((target("avx2"), always_inline)) inline void prefill_packed_steps_1x8_avx2(const uint8_t* q,
                                                                                       const int8_t* x,
                                                                                       int64_t blocks,
                                                                                       __m256i (&s)[8]) {
  const uint8_t* q_end = q + blocks * kBlockBytes;
  const __m256i mask = _mm256_set1_epi8(0x03);
  asm("1:\n\t"
      QAT_PACKED_BLOCK(QAT_GROUP_STEP0, QAT_GROUP_STEP, 256)
      "add $2048, %[x]\n\t"
      "add $64, %[q]\n\t"
      "cmp %[q_end], %[q]\n\t"
      "jb 1b"
      : [q] "+r"(q), [x] "+r"(x), [s0] "+x"(s[0]), [s1] "+x"(s[1]), [s2] "+x"(s[2]), [s3] "+x"(s[3]),
        [s4] "+x"(s[4]), [s5] "+x"(s[5]), [s6] "+x"(s[6]), [s7] "+x"(s[7])
      : [q_end] "r"(q_end), [mask] "x"(mask)
      : "cc", "memory", "xmm13", "xmm14", "xmm15");
}

// 32 stored values of a packed ternary row from column k (a multiple of 32), as bytes.
__attribute__((target("avx2"), always_inline)) inline __m256i packed_ternary_step(const uint8_t* wrow, int64_t k) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + k / 256 * kBlockBytes + k % 64));
  return _mm256_and_si256(_mm256_srl_epi16(bytes, _mm_cvtsi64_si128(2 * (k % 256 / 64))), _mm256_set1_epi8(0x03));
}

template <int RR, int TT, bool kPacked>
__attribute__((target("avx2,fma"))) void prefill_tile_avx2(const Problem& p, const int32_t* xsums,
                                                          const uint8_t* qrows, int64_t stride, int64_t n0,
                                                          int64_t t0) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x0 = p.act->codes.data() + t0 * p.padded_k;
  const int64_t vpb = p.values_per_block();
  int32_t qx[RR][TT][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[RR][TT];
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_si256();
    const int64_t k_end = p.group_end(g) * vpb;
    for (int64_t kc = g * p.blocks_per_group * vpb; kc < k_end; kc += kPrefillChunk) {
      const int64_t kc_end = std::min(kc + kPrefillChunk, k_end);
      __m256i s[RR][TT];
      for (int r = 0; r < RR; ++r)
        for (int t = 0; t < TT; ++t) s[r][t] = _mm256_setzero_si256();
      if constexpr (RR == 4 && TT == 2 && kPacked) {
        if (kc < kc_end) prefill_packed_steps_4x2_avx2(qrows, stride, x0, p.padded_k, kc / 256, kc_end / 256, s);
      } else if constexpr (RR == 4 && TT == 2) {
        if (kc < kc_end) prefill_steps_4x2_avx2(qrows, stride, x0, p.padded_k, kc, kc_end, s);
      } else {
        for (int64_t k = kc; k < kc_end; k += 32) {
          __m256i q[RR];
          for (int r = 0; r < RR; ++r)
            q[r] = kPacked ? packed_ternary_step(qrows + r * stride, k)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrows + r * stride + k));
          for (int t = 0; t < TT; ++t) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + t * p.padded_k + k));
            for (int r = 0; r < RR; ++r) s[r][t] = _mm256_add_epi16(s[r][t], _mm256_maddubs_epi16(q[r], xv));
          }
        }
      }
      for (int r = 0; r < RR; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s[r][t], ones));
    }
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < TT; ++t) qx[r][t][g] = hsum_avx2(acc[r][t]);
  }
  if constexpr (RR == 4) {
    if (p.groups == 1) {   // 4 adjacent rows, one division: the scalar epilogue took ~12% of the tile's time
      for (int t = 0; t < TT; ++t)
        finish4_spread(p, qx[0][t][0], qx[1][t][0], qx[2][t][0], qx[3][t][0], xsums[t0 + t], n0, 1, t0 + t);
      return;
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < TT; ++t) finish_row_unsigned(p, n0 + r, t0 + t, qx[r][t], xsums + (t0 + t) * p.groups);
}

// The packed bytes the next unpack will read. Unpacking rows for the tile waited on memory (60% of its samples on its
// first load, 30% of the tile's time at batch 8: the tiles issue no weight loads, so the hardware prefetcher idled
// between row blocks); the tiles now prefetch them, a slice per register tile (issued at once, the misses queued behind
// the L1's miss buffers: 5% of the time in the prefetch loop). Zen 3, 2 threads, weights streamed, 3 A/B rounds:
// ternary batch 8 1.09-1.20x -> 1.14-1.34x torch int8 dynamic (4096x4096 and 4096x11008).
struct NextRows {
  const uint8_t* bytes = nullptr;
  int64_t size = 0;
};

// Slice `part` of `parts` of next's cache lines.
inline void prefetch_slice(const NextRows& next, int64_t part, int64_t parts) {
  const int64_t lines = (next.size + 63) / 64;
  for (int64_t line = part * lines / parts; line < (part + 1) * lines / parts; ++line)
    _mm_prefetch(reinterpret_cast<const char*>(next.bytes + 64 * line), _MM_HINT_T0);
}

inline int64_t token_tiles(int64_t tokens) { return tokens / kPrefillTokens + tokens % kPrefillTokens; }

template <int RR, bool kPacked>
void prefill_token_tiles_avx2(const Problem& p, const int32_t* xsums, const uint8_t* qrows, int64_t stride,
                              int64_t n0, int64_t t, int64_t tokens, const NextRows& next, int64_t part,
                              int64_t parts) {
  for (; t + kPrefillTokens <= tokens; t += kPrefillTokens) {
    prefetch_slice(next, part++, parts);
    prefill_tile_avx2<RR, kPrefillTokens, kPacked>(p, xsums, qrows, stride, n0, t);
  }
  for (; t < tokens; ++t) {
    prefetch_slice(next, part++, parts);
    prefill_tile_avx2<RR, 1, kPacked>(p, xsums, qrows, stride, n0, t);
  }
}

// Rows n0 .. n0 + count at qrows (`stride` apart: unpacked stored values, or with kPacked the ternary rows as packed),
// times tokens t0 .. tokens, prefetching `next` meanwhile.
template <bool kPacked>
void prefill_rows_avx2(const Problem& p, const int32_t* xsums, const uint8_t* qrows, int64_t stride, int64_t n0,
                       int64_t count, int64_t t0, int64_t tokens, const NextRows& next) {
  const int64_t per_rows = token_tiles(tokens - t0);
  const int64_t parts = (count / kPrefillRows + count % kPrefillRows) * per_rows;
  int64_t r = 0, part = 0;
  for (; r + kPrefillRows <= count; r += kPrefillRows, part += per_rows)
    prefill_token_tiles_avx2<kPrefillRows, kPacked>(p, xsums, qrows + r * stride, stride, n0 + r, t0, tokens, next,
                                                    part, parts);
  for (; r < count; ++r, part += per_rows)
    prefill_token_tiles_avx2<1, kPacked>(p, xsums, qrows + r * stride, stride, n0 + r, t0, tokens, next, part,
                                         parts);
}

// Rows n0 .. n0 + count (at most kGroupRows) x the 8 tokens of token group `group`, on the 1 x 8 packed tile. K is
// walked in chunks of kGroupChunkBlocks blocks, each chunk through every row of the block, so the chunk's
// activations (16 KiB) stay in L1 for all of them; a row's next chunk (past its end: the next block's row) is
// prefetched while the block's other rows run. int16 bound: codes are within [-127, 127] and q <= 2, so a vpmaddubsw
// adds <= 508 to a lane, 64 steps (8 blocks) <= 32512. 8-block chunks measured 3-5% faster than 4-block ones (in
// turns, Zen 3, batch 8 and 16).
constexpr int64_t kGroupRows = 8;
constexpr int64_t kGroupChunkBlocks = 8;
__attribute__((target("avx2,fma"))) void prefill_group_rows_avx2(const Problem& p, const int32_t* xsums, int64_t n0,
                                                                int64_t count, int64_t group) {
  constexpr int64_t chunk_blocks = kGroupChunkBlocks;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t t0 = group * kGroupTokens;
  const int8_t* x8 = p.act->codes8.data() + t0 * p.padded_k;
  int32_t qx[kGroupRows][kGroupTokens][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[kGroupRows][kGroupTokens];
    for (int64_t r = 0; r < count; ++r)
      for (int t = 0; t < kGroupTokens; ++t) acc[r][t] = _mm256_setzero_si256();
    for (int64_t b0 = g * p.blocks_per_group; b0 < p.group_end(g); b0 += chunk_blocks) {
      const int64_t b1 = std::min(b0 + chunk_blocks, p.group_end(g));
      for (int64_t r = 0; r < count; ++r) {
        const uint8_t* wrow = p.w + (n0 + r) * p.row_bytes;
        const uint8_t* ahead = b1 < p.blocks() ? wrow + b1 * kBlockBytes : wrow + count * p.row_bytes;
        for (int64_t b = 0; b < chunk_blocks; ++b)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + b * kBlockBytes), _MM_HINT_T0);
        __m256i s[kGroupTokens];
        for (int t = 0; t < kGroupTokens; ++t) s[t] = _mm256_setzero_si256();
        prefill_packed_steps_1x8_avx2(wrow + b0 * kBlockBytes, x8 + b0 * 256 * kGroupTokens, b1 - b0, s);
        for (int t = 0; t < kGroupTokens; ++t)
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s[t], ones));
      }
    }
    for (int64_t r = 0; r < count; ++r)
      for (int t = 0; t < kGroupTokens; ++t) qx[r][t][g] = hsum_avx2(acc[r][t]);
  }
  for (int t = 0; t < kGroupTokens; ++t) {
    int64_t r = 0;
    if (p.groups == 1)
      for (; r + 4 <= count; r += 4)
        finish4_spread(p, qx[r][t][0], qx[r + 1][t][0], qx[r + 2][t][0], qx[r + 3][t][0], xsums[t0 + t], n0 + r, 1,
                       t0 + t);
    for (; r < count; ++r) finish_row_unsigned(p, n0 + r, t0 + t, qx[r][t], xsums + (t0 + t) * p.groups);
  }
}

// Ternary row n -> stored values q as bytes in column order.
__attribute__((target("avx2,fma"))) void unpack_ternary_row_avx2(const Problem& p, int64_t n, uint8_t* qrow) {
  const __m256i mask = _mm256_set1_epi8(0x03);
  const uint8_t* wrow = p.w + n * p.row_bytes;
  for (int64_t i = 0; i < p.row_bytes; i += 32) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + i));
    const int64_t block = i / kBlockBytes, half = i % kBlockBytes;
    for (int plane = 0; plane < 4; ++plane)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qrow + (block * 4 + plane) * kBlockBytes + half),
                          _mm256_and_si256(_mm256_srli_epi16(w, plane * 2), mask));
  }
}

// acc += u8 q x s8 x, 4 products per int32 lane, in place. GCC 12 compiles _mm512_dpbusd_epi32 on an array element
// into two register copies per instruction (the accumulator is not kept tied), which left the GEMM front-end bound.
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void dpbusd_avx512(__m512i& acc,
                                                                                              __m512i q,
                                                                                              __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(q), "v"(x));
}

// The lane sums of a, b, c, d as one vector: 13 instructions, where 4 separate reductions take ~32.
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline __m128i reduce4_avx512(
    __m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// qx[r][t][g] = the sum of lanes[r][t][0..16).
template <int RR, int TT>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void reduce_lanes_avx512(
    const int32_t (&lanes)[RR][TT][16], int32_t (&qx)[RR][TT][64], int64_t g) {
  for (int t = 0; t < TT; ++t) {
    int r = 0;
    for (; r + 4 <= RR; r += 4) {
      alignas(16) int32_t sums[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(sums),
                      reduce4_avx512(_mm512_load_si512(lanes[r][t]), _mm512_load_si512(lanes[r + 1][t]),
                                     _mm512_load_si512(lanes[r + 2][t]), _mm512_load_si512(lanes[r + 3][t])));
      for (int i = 0; i < 4; ++i) qx[r + i][t][g] = sums[i];
    }
    for (; r < RR; ++r) qx[r][t][g] = _mm512_reduce_add_epi32(_mm512_load_si512(lanes[r][t]));
  }
}

// Ternary decode on AVX-512 VNNI (RR rows x 1 token) without shifts: plane i of a byte is `w & (3 << 2i)`, i.e.
// q << 2i, which vpdpbusd multiplies as is into plane i's own accumulator; at the group's end the accumulators are
// shifted back (exact: every product of plane i is a multiple of 4^i). Shifts and vpdpbusd both issue on port 0 of
// Intel's AVX-512 cores, so dropping the shift leaves vpdpbusd (port 0) and the mask (ports 0/5): ~1.6x the
// shift + mask form's rate, which was below the memory's. Bounds: a plane-3 lane gains <= 4 * 128 * 128 = 2^16 per
// block, so int32 holds any in_features below 2^15 blocks (8.4M).
//
// The RR rows of a tile are `spread` rows apart (a quarter of the thread's rows): each thread then reads RR
// sequential streams in different pages, which the L2 streamer follows in parallel, where RR adjacent rows share
// one 4 KiB page and one stream (27.7 vs 24 GB/s read on 2 cores of a Sapphire Rapids class VM). Each stream is
// prefetched kDecodePrefetchRows rows ahead.

template <int RR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void decode_ternary_avx512(const Problem& p,
                                                                                 const int32_t* xsums, int64_t n0,
                                                                                 int64_t spread, int64_t t) {
  constexpr int planes = 4;
  const int8_t* x0 = p.act->codes.data() + t * p.padded_k;
  __m512i mask[planes];
  for (int plane = 0; plane < planes; ++plane) mask[plane] = _mm512_set1_epi8(static_cast<char>(3 << (2 * plane)));
  int32_t qx[RR][1][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[RR][planes];
    for (int r = 0; r < RR; ++r)
      for (int plane = 0; plane < planes; ++plane) acc[r][plane] = _mm512_setzero_si512();
    for (int64_t b = g * p.blocks_per_group; b < p.group_end(g); ++b) {
      __m512i w[RR];
      for (int r = 0; r < RR; ++r) {
        const uint8_t* wb = p.w + (n0 + r * spread) * p.row_bytes + b * kBlockBytes;
        _mm_prefetch(reinterpret_cast<const char*>(wb + kDecodePrefetchRows * p.row_bytes), _MM_HINT_T0);
        w[r] = _mm512_loadu_si512(wb);
      }
#pragma GCC unroll 4
      for (int plane = 0; plane < planes; ++plane) {
        const __m512i xv = _mm512_loadu_si512(x0 + (b * planes + plane) * kBlockBytes);
        for (int r = 0; r < RR; ++r) dpbusd_avx512(acc[r][plane], _mm512_and_si512(w[r], mask[plane]), xv);
      }
    }
    __m512i sums[RR];
    for (int r = 0; r < RR; ++r)
      sums[r] = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)),
                                 _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
    if constexpr (RR == 4) {
      if (p.groups == 1) {
        alignas(16) int32_t q[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(q), reduce4_avx512(sums[0], sums[1], sums[2], sums[3]));
        return finish4_spread(p, q[0], q[1], q[2], q[3], xsums[t], n0, spread, t);
      }
    }
    alignas(64) int32_t lanes[RR][1][16];
    for (int r = 0; r < RR; ++r) _mm512_store_si512(lanes[r][0], sums[r]);
    reduce_lanes_avx512<RR, 1>(lanes, qx, g);
  }
  for (int r = 0; r < RR; ++r) finish_row_unsigned(p, n0 + r * spread, t, qx[r][0], xsums + t * p.groups);
}

template <bool AVX512>
void ternary_rows_simd(const Problem& p, const int32_t* xsums, int64_t n0, int64_t n1) {
  constexpr int kRowTile = 4;
  // avx512_vnni runs 2+ tokens in the GEMM (gemm_ternary_avx512), so here it only decodes.
  // AVX2 prefill, a block of rows at a time (in L1/L2), every token from the packed rows: whole groups of 8 tokens
  // (those of Activations::codes8) on the 1 x 8 tile, the other (< 8) on the 4 x 2 tile. Both beat unpacking rows
  // once per block for the 4 x 2 tile, which more tokens reuse (measured in turns on Zen 3, 2 threads, weights
  // streamed, 4096x4096, 4096x11008, 1536x8192, times torch int8 dynamic; 1 x 8 vs unpacked rows: batch 24
  // 1.43-1.63x vs 1.02-1.45x, batch 64 1.49-1.59x vs 1.16-1.53x; at 2-16 tokens the 4 x 2 tile on packed rows vs
  // unpacked: batch 2 2.1-2.6x vs 1.6-1.9x).
  if (!AVX512 && p.tokens >= 2) {
    const int64_t grouped = static_cast<int64_t>(p.act->codes8.size()) / p.padded_k;
    const int64_t block = grouped > 0 ? kGroupRows : kPrefillRows;
    for (int64_t n = n0; n < n1; n += block) {
      const int64_t count = std::min<int64_t>(block, n1 - n);
      const int64_t next_rows = std::min<int64_t>(block, n1 - n - count);
      const NextRows next{p.w + (n + count) * p.row_bytes, next_rows * p.row_bytes};
      for (int64_t group = 0; group < grouped / kGroupTokens; ++group)
        prefill_group_rows_avx2(p, xsums, n, count, group);
      if (grouped < p.tokens)
        prefill_rows_avx2<true>(p, xsums, p.w + n * p.row_bytes, p.row_bytes, n, count, grouped, p.tokens, next);
    }
    return;
  }
  for (int64_t t = 0; t < p.tokens; ++t) {     // decode: 4 rows x 1 token
    const int64_t spread = (n1 - n0) / kRowTile;
    if constexpr (AVX512) {
      for (int64_t n = n0; n < n0 + spread; ++n) decode_ternary_avx512<kRowTile>(p, xsums, n, spread, t);
      for (int64_t n = n0 + kRowTile * spread; n < n1; ++n) decode_ternary_avx512<1>(p, xsums, n, 0, t);
    } else {
      for (int64_t n = n0; n < n0 + spread; ++n) decode_ternary_avx2<kRowTile>(p, xsums, n, spread, t);
      for (int64_t n = n0 + kRowTile * spread; n < n1; ++n) decode_ternary_avx2<1>(p, xsums, n, 0, t);
    }
  }
}

// ---------------------------------------------------------------- binary: AVX2 table lookup
// AVX2 tables of one token (kLutBytes per 4-column group): entry e of group j (columns 4j..4j+3) stands for
// sum_i s_i x_i, s_i = bit i of e ? 1 : -1, the signed dot of the 4 weights whose bits spell e (no sum(x)
// correction). vpshufb returns bytes and an entry needs 10 bits, so each term is offset into a byte,
// t_i = s_i x_i + 127 in [0, 254] (codes are in [-127, 127]), and split into nibbles: the low table holds
// L(e) = sum_i (t_i & 15), the high table H(e) = sum_i (t_i >> 4), both <= 60, and L(e) + 16 H(e) is the entry
// plus 508. Per input byte c the 64 bytes are L of groups 2c and 2c + 1, then H of the two. Entries that stay
// bytes let the lookup add 4 of them (2 groups x 2 input bytes) per byte lane before one unpack + vpmaddubsw by
// (1, 16) forms the int16 sums; int16 tables (low and high bytes apart, as the VBMI path reads them) need an unpack
// per lookup: 8 shuffle-port uops per 256 weights instead of 4, 2.14 vs 1.68 ns per tile and input byte in L2
// (1 thread, Sapphire Rapids class VM).
// Built per input byte: a 128-bit lane per group holds its 4 terms for +1 weights (code + 127) and for -1 weights
// (127 - code); each of the 4 terms of an entry is one vpshufb of those bytes' nibbles (picks below), summed.
// The 16 table entries of both groups (one per 128-bit lane): sums of the 4 terms each entry picks.
__attribute__((target("avx2,fma"), always_inline)) inline __m256i sum_picks(__m256i nibbles,
                                                                            const __m256i (&picks)[4]) {
  const __m256i terms01 = _mm256_add_epi8(_mm256_shuffle_epi8(nibbles, picks[0]),
                                          _mm256_shuffle_epi8(nibbles, picks[1]));
  const __m256i terms23 = _mm256_add_epi8(_mm256_shuffle_epi8(nibbles, picks[2]),
                                          _mm256_shuffle_epi8(nibbles, picks[3]));
  return _mm256_add_epi8(terms01, terms23);
}

__attribute__((target("avx2,fma"))) void build_binary_luts_avx2(const int8_t* x, int64_t padded_k, uint8_t* luts) {
  // picks[i], per lane (group 2c + lane, codes 4 lane .. 4 lane + 3): entry e takes code i's byte of the +1 terms
  // (bytes 0-7) if bit i of e is set, else of the -1 terms (bytes 8-15).
  alignas(32) uint8_t pick[4][32];
  for (int i = 0; i < 4; ++i)
    for (int lane = 0; lane < 2; ++lane)
      for (int e = 0; e < 16; ++e)
        pick[i][16 * lane + e] = static_cast<uint8_t>(((e >> i) & 1 ? 0 : 8) + 4 * lane + i);
  __m256i picks[4];
  for (int i = 0; i < 4; ++i) picks[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pick[i]));
  const __m256i k127 = _mm256_set1_epi8(127), nibble = _mm256_set1_epi8(0x0F);
  for (int64_t c = 0; c < padded_k / 8; ++c) {
    int64_t eight;
    std::memcpy(&eight, x + 8 * c, 8);
    const __m256i codes = _mm256_set1_epi64x(eight);
    // Bytes wrap mod 256, so code + 127 and 127 - code are their unsigned values in [0, 254].
    const __m256i terms = _mm256_unpacklo_epi64(_mm256_add_epi8(codes, k127), _mm256_sub_epi8(k127, codes));
    const __m256i low = sum_picks(_mm256_and_si256(terms, nibble), picks);
    const __m256i high = sum_picks(_mm256_and_si256(_mm256_srli_epi16(terms, 4), nibble), picks);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(luts + 2 * c * kLutBytes), low);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(luts + 2 * c * kLutBytes + 32), high);
  }
}

// The VBMI decode's tables (below) on AVX-512 VNNI + VBMI, one input byte c (groups 2c, 2c + 1: a 64-byte table) per
// step: entry e of a group, sum_i s_i x_i as above, as int16, its 16 low bytes then its 16 high bytes. The entry is
// a dot of the group's 4 codes with the signs s_i(e), i.e. one vpdpbusd lane. vpdpbusd multiplies unsigned by
// signed bytes, so the codes enter as u = x + 128 (x ^ 0x80) and the lane starts at -128 * sum_i s_i(e):
// sum s_i (u_i - 128) = sum s_i x_i. Two vpdpbusd give both groups' 16 entries as int32, a vpackssdw
// (|entry| <= 512) and a vpermb order the low and high bytes: 4 vector uops per 8 codes instead of ~30 in an AVX2
// build (then ~2.3 us of a 4096x4096 decode matmul, serially before its threads start).
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) void build_binary_luts_vnni(const int8_t* x,
                                                                                            int64_t padded_k,
                                                                                            uint8_t* luts) {
  alignas(64) int8_t signs[64];
  alignas(64) int32_t start[16];
  alignas(64) uint8_t order[64];
  for (int e = 0; e < 16; ++e) {
    int sum = 0;
    for (int i = 0; i < 4; ++i) sum += signs[4 * e + i] = static_cast<int8_t>((e >> i) & 1 ? 1 : -1);
    start[e] = -128 * sum;
  }
  // vpackssdw interleaves per 128-bit lane L: words 8L .. 8L + 3 = even entries 4L .. 4L + 3, 8L + 4 .. = odd ones.
  for (int half = 0; half < 2; ++half)   // 0: even group, 1: odd group
    for (int e = 0; e < 16; ++e) {
      const int word = 8 * (e / 4) + 4 * half + e % 4;
      order[32 * half + e] = static_cast<uint8_t>(2 * word);            // low byte
      order[32 * half + 16 + e] = static_cast<uint8_t>(2 * word + 1);   // high byte
    }
  const __m512i sign = _mm512_load_si512(signs), init = _mm512_load_si512(start), perm = _mm512_load_si512(order);
  const __m512i bias = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  for (int64_t c = 0; c < padded_k / 8; ++c) {
    int32_t even, odd;
    std::memcpy(&even, x + 8 * c, 4);
    std::memcpy(&odd, x + 8 * c + 4, 4);
    const __m512i e = _mm512_dpbusd_epi32(init, _mm512_xor_si512(_mm512_set1_epi32(even), bias), sign);
    const __m512i o = _mm512_dpbusd_epi32(init, _mm512_xor_si512(_mm512_set1_epi32(odd), bias), sign);
    _mm512_storeu_si512(luts + 2 * c * kLutBytes, _mm512_permutexvar_epi8(perm, _mm512_packs_epi32(e, o)));
  }
}

// Binary table lookup over TILES tiles (32 rows each) for TT tokens (tables of token t0 + i at luts + i * lut_bytes),
// a pair of input bytes c, c + 1 per step. Each 32-byte load gives the low nibbles (group 2c) and high nibbles (group
// 2c + 1) of 32 rows, and each nibble vector indexes its group's low and high tables; a byte lane adds the 4 low
// (and 4 high) entries of a row, <= 240, before unpack + vpmaddubsw by (1, 16) forms the int16 sums L + 16 H in row
// order (the layout's position order): <= 4080 per pair. int16 lanes take kLutChunkAvx2 = 16 input bytes (8
// pairs, <= 32640) before widening to int32, started at -16256, the offsets (508 per group) of the chunk's 32
// groups, so they hold [-16256, 16384] and widen to signed dots. The nibble extraction is shared by the TT tokens,
// and a tile's bytes stay in L1 from one token pair to the next. Decode (1 token) runs TILES tiles `spread` tiles
// apart together, one read stream each: 2 instead of 1 took 17.6 -> 20.0 GB/s (4096x4096) and 19.8 -> 22.9
// (4096x11008) streamed, 2 cores, Sapphire Rapids class VM (path forced to avx2, int16 tables); 4 instead of 2
// took 23.7 -> 24.5 and 25.5 -> 27.0 GB/s (3: 23.5 and 26.1).
constexpr int64_t kLutChunk = 32;        // VBMI decode: even and odd sums apart, 32 entries each
constexpr int64_t kLutChunkAvx2 = 16;
constexpr int64_t kBinaryPrefetchBytes = 2048;
constexpr int kSpreadTilesAvx2 = 4;

// One 16-byte table in both 128-bit lanes (vpshufb looks up within each lane).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i broadcast_table(const uint8_t* table) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
}

// finish_row for a binary tile's 32 signed dots (rows 8q .. 8q + 7 in dots[q]) with one group, 8 rows per vector: the
// same IEEE operations in the same order as the scalar epilogue (see finish_tile_avx512).
__attribute__((target("avx2,fma"), always_inline)) inline void finish_tile_avx2(const Problem& p,
                                                                              const __m256i (&dots)[4],
                                                                              int64_t tile, int64_t t) {
  const __m256 x_scale = _mm256_set1_ps(p.act->scales[t]);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int q = 0; q < 4; ++q) {
    const int64_t n0 = tile * kBinaryTile + 8 * q;
    if (n0 >= p.rows) break;
    const int live_rows = static_cast<int>(std::min<int64_t>(8, p.rows - n0));
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(live_rows), lane);
    const __m256 ws = _mm256_maskload_ps(p.w_scale + n0, live);
    const __m256 acc = _mm256_add_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_cvtepi32_ps(dots[q]), ws));
    _mm256_maskstore_ps(p.y + t * p.rows + n0, live, _mm256_div_ps(acc, x_scale));
  }
}

template <int TT, int TILES = 1>
__attribute__((target("avx2,fma"))) void lut_tile_avx2(const Problem& p, const uint8_t* luts, int64_t lut_bytes,
                                                      int64_t tile0, int64_t spread, int64_t t0) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i low_high = _mm256_set1_epi16(0x1001);   // vpmaddubsw weights: 1 for L (low byte), 16 for H
  const __m256i chunk_offset = _mm256_set1_epi16(-2 * kLutChunkAvx2 * 508);
  const uint8_t* w[TILES];
  for (int i = 0; i < TILES; ++i) w[i] = p.w + (tile0 + i * spread) * p.row_bytes * kBinaryTile;
  alignas(32) int32_t dots[TILES][TT][64][kBinaryTile];   // per tile, per token, per group, per row of the tile
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[TILES][TT][4];   // int32: rows 0-7, 8-15, 16-23, 24-31
    for (int i = 0; i < TILES; ++i)
      for (int t = 0; t < TT; ++t)
        for (auto& a : acc[i][t]) a = _mm256_setzero_si256();
    const int64_t c_end = p.group_end(g) * kBlockBytes;   // a 512-value block spans 64 input bytes
    for (int64_t c0 = g * p.blocks_per_group * kBlockBytes; c0 < c_end; c0 += kLutChunkAvx2) {
      __m256i sums[TILES][TT][2];   // int16 L + 16 H: unpacklo / unpackhi order
      for (int i = 0; i < TILES; ++i)
        for (int t = 0; t < TT; ++t) sums[i][t][0] = sums[i][t][1] = chunk_offset;
      for (int64_t c = c0; c < c0 + kLutChunkAvx2; c += 2) {
        for (int i = 0; i < TILES; ++i) {
          // One prefetch per pair: its 64 bytes are one cache line where the weights are 64-byte aligned.
          _mm_prefetch(reinterpret_cast<const char*>(w[i] + c * kBinaryTile + kBinaryPrefetchBytes), _MM_HINT_T0);
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * kBinaryTile));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + (c + 1) * kBinaryTile));
          const __m256i even0 = _mm256_and_si256(w0, nibble);
          const __m256i odd0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), nibble);
          const __m256i even1 = _mm256_and_si256(w1, nibble);
          const __m256i odd1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), nibble);
          for (int t = 0; t < TT; ++t) {
            const uint8_t* lut = luts + t * lut_bytes + 2 * c * kLutBytes;   // c: +0, c + 1: +64
            const __m256i low = _mm256_add_epi8(
                _mm256_add_epi8(_mm256_shuffle_epi8(broadcast_table(lut), even0),
                                _mm256_shuffle_epi8(broadcast_table(lut + 16), odd0)),
                _mm256_add_epi8(_mm256_shuffle_epi8(broadcast_table(lut + 64), even1),
                                _mm256_shuffle_epi8(broadcast_table(lut + 80), odd1)));
            const __m256i high = _mm256_add_epi8(
                _mm256_add_epi8(_mm256_shuffle_epi8(broadcast_table(lut + 32), even0),
                                _mm256_shuffle_epi8(broadcast_table(lut + 48), odd0)),
                _mm256_add_epi8(_mm256_shuffle_epi8(broadcast_table(lut + 96), even1),
                                _mm256_shuffle_epi8(broadcast_table(lut + 112), odd1)));
            __m256i(&s)[2] = sums[i][t];
            s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(low, high), low_high));
            s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(low, high), low_high));
          }
        }
      }
      // unpacklo lanes hold rows 0-7 | 8-15, unpackhi rows 16-23 | 24-31.
      for (int i = 0; i < TILES; ++i)
        for (int t = 0; t < TT; ++t)
          for (int half = 0; half < 2; ++half) {   // 0: unpacklo, 1: unpackhi
            __m256i(&a)[4] = acc[i][t];
            a[2 * half] = _mm256_add_epi32(a[2 * half],
                                           _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sums[i][t][half])));
            a[2 * half + 1] = _mm256_add_epi32(a[2 * half + 1],
                                               _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sums[i][t][half], 1)));
          }
    }
    if (p.groups == 1) {
      for (int i = 0; i < TILES; ++i)
        for (int t = 0; t < TT; ++t) finish_tile_avx2(p, acc[i][t], tile0 + i * spread, t0 + t);
      return;
    }
    for (int i = 0; i < TILES; ++i)
      for (int t = 0; t < TT; ++t)
        for (int q = 0; q < 4; ++q)
          _mm256_store_si256(reinterpret_cast<__m256i*>(dots[i][t][g] + 8 * q), acc[i][t][q]);
  }
  int32_t row_dots[64];
  for (int i = 0; i < TILES; ++i) {
    const int64_t tile = tile0 + i * spread;
    for (int t = 0; t < TT; ++t)
      for (int64_t r = 0; r < kBinaryTile && tile * kBinaryTile + r < p.rows; ++r) {
        for (int64_t g = 0; g < p.groups; ++g) row_dots[g] = dots[i][t][g][r];
        finish_row(p, tile * kBinaryTile + r, t0 + t, row_dots);
      }
  }
}

// Binary decode (1 token) on AVX-512 VBMI: the same tables, looked up by vpermb, which indexes a whole 64-byte
// register, i.e. both groups' low and high bytes of one input byte c (the table layout per c). Each row's byte is
// doubled into a 16-bit lane (one vpermb), its low nibble picks the low then the high byte of the even group's sum
// (indices n and 16 + n; one vpternlogd), its high nibble those of the odd group (32 + n, 48 + n; a shift and one
// vpternlogd), so one vpermb per group gives the 32 rows' int16 sums in place, without the AVX2 path's split
// lookups and unpacks: 3 shuffle-port uops per 256 weights instead of 8 (the shuffle port bounds both).
// TILES tiles `spread` tiles apart run together: they share the table loads and read TILES sequential streams.
// Sums stay in tile position order (word j = position j); the epilogue maps rows to positions.
// finish_row for a binary tile's 32 signed dots with one group, 16 rows per vector: the same IEEE operations in the
// same order (int -> float, * w_scale, 0 + product, / x_scale), so results stay bit-identical to every other path;
// the scalar epilogue (32 divisions) took ~10% of a tile's time at in_features 4096. `pos0_15` / `pos16_31` hold the
// dots in tile position order: rows 0-7 are positions 0-7, rows 8-15 positions 16-23, rows 16-23 positions 8-15,
// rows 24-31 positions 24-31 (binary_tile_pos).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void finish_tile_avx512(const Problem& p,
                                                                                        __m512i pos0_15,
                                                                                        __m512i pos16_31,
                                                                                        int64_t tile, int64_t t) {
  const __m512 x_scale = _mm512_set1_ps(p.act->scales[t]);
  const __m512i halves[2] = {_mm512_shuffle_i64x2(pos0_15, pos16_31, 0x44),    // rows 0-15
                             _mm512_shuffle_i64x2(pos0_15, pos16_31, 0xEE)};   // rows 16-31
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = tile * kBinaryTile + 16 * h;
    if (n0 >= p.rows) break;
    const __mmask16 live = p.rows - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (p.rows - n0)) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(live, p.w_scale + n0);
    const __m512 acc = _mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_cvtepi32_ps(halves[h]), ws));
    _mm512_mask_storeu_ps(p.y + t * p.rows + n0, live, _mm512_div_ps(acc, x_scale));
  }
}

template <int TILES>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void lut_tiles_vbmi(const Problem& p, const uint8_t* lut,
                                                                          int64_t tile0, int64_t spread, int64_t t) {
  alignas(64) uint8_t dup_bytes[64];
  for (int j = 0; j < 64; ++j) dup_bytes[j] = static_cast<uint8_t>(j / 2);
  const __m512i dup = _mm512_load_si512(dup_bytes);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i even_sel = _mm512_set1_epi16(0x1000), odd_sel = _mm512_set1_epi16(0x3020);
  const uint8_t* w[TILES];
  for (int i = 0; i < TILES; ++i) w[i] = p.w + (tile0 + i * spread) * p.row_bytes * kBinaryTile;
  alignas(64) int32_t dots[TILES][64][kBinaryTile];   // per tile, per group, per position
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[TILES][2];   // int32: positions 0-15, 16-31
    for (int i = 0; i < TILES; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const int64_t c_end = p.group_end(g) * kBlockBytes;
    for (int64_t c0 = g * p.blocks_per_group * kBlockBytes; c0 < c_end; c0 += kLutChunk) {
      __m512i even[TILES], odd[TILES];   // int16 sums of the even / odd groups, <= 32 entries each
      for (int i = 0; i < TILES; ++i) even[i] = odd[i] = _mm512_setzero_si512();
#pragma GCC unroll 2
      for (int64_t c = c0; c < c0 + kLutChunk; ++c) {
        const __m512i table = _mm512_loadu_si512(lut + 2 * c * kLutBytes);
        for (int i = 0; i < TILES; ++i) {
          if ((c & 1) == 0)   // one prefetch per 64-byte line
            _mm_prefetch(reinterpret_cast<const char*>(w[i] + c * kBinaryTile + kBinaryPrefetchBytes), _MM_HINT_T0);
          const __m512i pairs = _mm512_permutexvar_epi8(
              dup, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * kBinaryTile))));
          const __m512i idx_even = _mm512_ternarylogic_epi32(pairs, nibble, even_sel, 0xEA);   // (a & b) | c
          const __m512i idx_odd = _mm512_ternarylogic_epi32(_mm512_srli_epi16(pairs, 4), nibble, odd_sel, 0xEA);
          even[i] = _mm512_add_epi16(even[i], _mm512_permutexvar_epi8(idx_even, table));
          odd[i] = _mm512_add_epi16(odd[i], _mm512_permutexvar_epi8(idx_odd, table));
        }
      }
      for (int i = 0; i < TILES; ++i)
        for (const __m512i& sums : {even[i], odd[i]}) {
          acc[i][0] = _mm512_add_epi32(acc[i][0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(sums)));
          acc[i][1] = _mm512_add_epi32(acc[i][1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sums, 1)));
        }
    }
    if (p.groups == 1) {
      for (int i = 0; i < TILES; ++i) finish_tile_avx512(p, acc[i][0], acc[i][1], tile0 + i * spread, t);
      return;
    }
    for (int i = 0; i < TILES; ++i) {
      _mm512_store_si512(dots[i][g], acc[i][0]);
      _mm512_store_si512(dots[i][g] + 16, acc[i][1]);
    }
  }
  int32_t row_dots[64];
  for (int i = 0; i < TILES; ++i) {
    const int64_t tile = tile0 + i * spread;
    for (int64_t r = 0; r < kBinaryTile && tile * kBinaryTile + r < p.rows; ++r) {
      for (int64_t g = 0; g < p.groups; ++g) row_dots[g] = dots[i][g][binary_tile_pos(r)];
      finish_row(p, tile * kBinaryTile + r, t, row_dots);
    }
  }
}

// Binary decode tiles [tile0, tile1) on AVX-512 VBMI, kSpreadTiles tiles (spread over the range) at a time.
constexpr int kSpreadTiles = 4;
void binary_tiles_vbmi(const Problem& p, const uint8_t* luts, int64_t tile0, int64_t tile1) {
  const int64_t spread = (tile1 - tile0) / kSpreadTiles;
  for (int64_t tile = tile0; tile < tile0 + spread; ++tile) lut_tiles_vbmi<kSpreadTiles>(p, luts, tile, spread, 0);
  for (int64_t tile = tile0 + kSpreadTiles * spread; tile < tile1; ++tile) lut_tiles_vbmi<1>(p, luts, tile, 0, 0);
}

// Binary tiles [tile0, tile1). `luts` holds the tables of the tokens from first_lut_token on.
void binary_tiles_avx2(const Problem& p, const int32_t* xsums, const uint8_t* luts, int64_t tile0, int64_t tile1) {
  const int64_t first = first_lut_token(p.tokens);
  if (first > 0) {   // prefill: a tile unpacked at a time (in L2), tokens [0, first)
    const int64_t stride = p.padded_k + kPrefillStridePad;
    std::vector<uint8_t> qrows(kBinaryTile * stride);
    const int64_t tile_bytes = kBinaryTile * p.row_bytes;
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      unpack_binary_tile(p, tile, qrows.data(), stride);
      const NextRows next{p.w + (tile + 1) * tile_bytes, tile + 1 < tile1 ? tile_bytes : 0};
      prefill_rows_avx2<false>(p, xsums, qrows.data(), stride, tile * kBinaryTile,
                               std::min(kBinaryTile, p.rows - tile * kBinaryTile), 0, first, next);
    }
  }
  const int64_t lut_bytes = p.padded_k / 4 * kLutBytes;
  if (p.tokens == 1) {   // decode: kSpreadTilesAvx2 tiles spread over the range at once, one stream each
    const int64_t spread = (tile1 - tile0) / kSpreadTilesAvx2;
    for (int64_t tile = tile0; tile < tile0 + spread; ++tile)
      lut_tile_avx2<1, kSpreadTilesAvx2>(p, luts, lut_bytes, tile, spread, 0);
    for (int64_t tile = tile0 + kSpreadTilesAvx2 * spread; tile < tile1; ++tile)
      lut_tile_avx2<1>(p, luts, lut_bytes, tile, 0, 0);
    return;
  }
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    int64_t t = first;
    for (; t + 2 <= p.tokens; t += 2) lut_tile_avx2<2>(p, luts + (t - first) * lut_bytes, lut_bytes, tile, 0, t);
    if (t < p.tokens) lut_tile_avx2<1>(p, luts + (t - first) * lut_bytes, lut_bytes, tile, 0, t);
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI GEMM (prefill, batched decode)
// From kGemmMinTokens tokens on, the weights are unpacked once per call into stored values as bytes (a few rows at
// a time, so they stay in L1/L2) and a register tile of kGemmRows rows x kGemmTokens tokens streams the tokens'
// codes over them: per 64 columns, RR + TT loads and RR * TT vpdpbusd (u8 stored value x s8 code, 4 products per
// int32 lane), no unpacking in the inner loop. Ternary and binary share the micro-kernel; their unpacking differs.
// Bounds: a lane gains <= 4 * 2 * 128 = 1024 per vpdpbusd, so int32 holds any in_features below 2^21 * 16.
constexpr int kGemmRows = 4;
constexpr int kGemmTokens = 6;
constexpr int64_t kGemmMinTokens = 2;

// Unpacked rows are kGemmStridePad bytes longer than padded_k: at a stride of a multiple of 4 KiB, the rows' bytes
// at one column would all fall in one L1 set (4K aliasing), more rows than the set's ways.
constexpr int64_t kGemmStridePad = 64;
inline int64_t gemm_stride(const Problem& p) { return p.padded_k + kGemmStridePad; }

// 64-byte aligned scratch for unpacked rows.
struct AlignedBytes {
  explicit AlignedBytes(int64_t n) : data(static_cast<uint8_t*>(std::aligned_alloc(64, (n + 63) / 64 * 64))) {
    TORCH_CHECK(data != nullptr, "packed_linear: out of memory for ", n, " bytes of unpacked weights");
  }
  ~AlignedBytes() { std::free(data); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  uint8_t* data;
};

// finish_row_unsigned for 4 rows x TT tokens with one group, 4 rows per vector: the same IEEE operations in the same
// order (int -> float, * w_scale, 0 + product, / x_scale), so results stay bit-identical to every other path. Per
// output it is ~3 instructions where the scalar epilogue takes ~10, which mattered at small in_features.
template <int TT>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void finish4_avx512(
    const Problem& p, const int32_t (&lanes)[4][TT][16], const int32_t* xsums, int64_t n0, int64_t t0) {
  const __m128 ws = _mm_loadu_ps(p.w_scale + n0);
  for (int t = 0; t < TT; ++t) {
    __m128i dots = reduce4_avx512(_mm512_load_si512(lanes[0][t]), _mm512_load_si512(lanes[1][t]),
                                  _mm512_load_si512(lanes[2][t]), _mm512_load_si512(lanes[3][t]));
    if (p.bits == 1) dots = _mm_add_epi32(dots, dots);   // binary: 2 * sum(b x) - sum(x)
    dots = _mm_sub_epi32(dots, _mm_set1_epi32(xsums[t0 + t]));
    const __m128 acc = _mm_add_ps(_mm_setzero_ps(), _mm_mul_ps(_mm_cvtepi32_ps(dots), ws));
    _mm_storeu_ps(p.y + (t0 + t) * p.rows + n0, _mm_div_ps(acc, _mm_set1_ps(p.act->scales[t0 + t])));
  }
}

// Rows n0 .. n0 + RR (stored values as bytes at qrows, stride gemm_stride) x tokens t0 .. t0 + TT.
template <int RR, int TT>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void gemm_tile_avx512(const Problem& p, const int32_t* xsums,
                                                                            const uint8_t* qrows, int64_t n0,
                                                                            int64_t t0) {
  const int64_t stride = gemm_stride(p);
  const int8_t* x0 = p.act->codes.data() + t0 * p.padded_k;
  const int64_t vpb = p.values_per_block();
  int32_t qx[RR][TT][64];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[RR][TT];
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_si512();
    const int64_t k_end = p.group_end(g) * vpb;
    for (int64_t k = g * p.blocks_per_group * vpb; k < k_end; k += 64) {
      __m512i q[RR];
#pragma GCC unroll 8
      for (int r = 0; r < RR; ++r) q[r] = _mm512_load_si512(qrows + r * stride + k);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const __m512i xv = _mm512_loadu_si512(x0 + t * p.padded_k + k);
#pragma GCC unroll 8
        for (int r = 0; r < RR; ++r) dpbusd_avx512(acc[r][t], q[r], xv);
      }
    }
    // Lane sums, four rows at a time (reduce4_avx512), from the accumulators stored once.
    alignas(64) int32_t lanes[RR][TT][16];
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) _mm512_store_si512(lanes[r][t], acc[r][t]);
    if constexpr (RR == 4) {
      if (p.groups == 1) return finish4_avx512<TT>(p, lanes, xsums, n0, t0);
    }
    reduce_lanes_avx512<RR, TT>(lanes, qx, g);
  }
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < TT; ++t) finish_row_unsigned(p, n0 + r, t0 + t, qx[r][t], xsums + (t0 + t) * p.groups);
}

// One tile of `tokens` (1 .. kGemmTokens) tokens from t0 on.
template <int RR, int TT = kGemmTokens>
void gemm_token_tile(const Problem& p, const int32_t* xsums, const uint8_t* qrows, int64_t n0, int64_t t0,
                     int64_t tokens) {
  if constexpr (TT >= 1) {
    if (tokens == TT) return gemm_tile_avx512<RR, TT>(p, xsums, qrows, n0, t0);
    gemm_token_tile<RR, TT - 1>(p, xsums, qrows, n0, t0, tokens);
  }
}

// RR unpacked rows from n0 on, times every token, in tiles of near-equal size (8 tokens: 4 + 4, not 6 + 2).
template <int RR>
void gemm_rows_all_tokens(const Problem& p, const int32_t* xsums, const uint8_t* qrows, int64_t n0) {
  const int64_t tiles = (p.tokens + kGemmTokens - 1) / kGemmTokens;
  for (int64_t i = 0, t = 0; i < tiles; ++i) {
    const int64_t size = p.tokens / tiles + (i < p.tokens % tiles ? 1 : 0);
    gemm_token_tile<RR>(p, xsums, qrows, n0, t, size);
    t += size;
  }
}

// Rows [n0, n1), unpacked at qrows (row n at qrows + (n - n0) * gemm_stride), times every token.
void gemm_rows(const Problem& p, const int32_t* xsums, const uint8_t* qrows, int64_t n0, int64_t n1) {
  const int64_t stride = gemm_stride(p);
  int64_t n = n0;
  for (; n + kGemmRows <= n1; n += kGemmRows) gemm_rows_all_tokens<kGemmRows>(p, xsums, qrows + (n - n0) * stride, n);
  for (; n < n1; ++n) gemm_rows_all_tokens<1>(p, xsums, qrows + (n - n0) * stride, n);
}

// Ternary rows [n0, n1): unpack kGemmRows rows (4 x padded_k bytes, in L1 for in_features <= 8192), run them.
void gemm_ternary_avx512(const Problem& p, const int32_t* xsums, int64_t n0, int64_t n1) {
  AlignedBytes qrows(kGemmRows * gemm_stride(p));
  for (int64_t n = n0; n < n1; n += kGemmRows) {
    const int64_t end = std::min(n + kGemmRows, n1);
    for (int64_t r = n; r < end; ++r) unpack_ternary_row_avx2(p, r, qrows.data + (r - n) * gemm_stride(p));
    gemm_rows(p, xsums, qrows.data, n, end);
  }
}

// Binary tile -> stored bits as bytes of the 8 rows at positions 8h .. 8h + 7 (rows binary_tile_pos(8h) .. + 7, in
// order; like unpack_binary_tile), vectorized: per 8 input bytes c0..c0+7 of the 32 positions (256 bytes,
// c-major), two rounds of vpermt2b transpose them to one 8-byte word per row (bytes c0..c0+7), which, as a 64-bit
// mask, selects bytes of ones: 64 stored values per masked move. 8 rows (not the tile's 32) keep the unpacked
// rows in L1 for the GEMM that follows.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void unpack_binary_rows8_avx512(const Problem& p,
                                                                                      int64_t tile, int h,
                                                                                      uint8_t* qrows) {
  alignas(64) uint8_t idx_c4[64], idx_c8[64];
  for (int m = 0; m < 64; ++m) {
    // Round 1, from (z0, z1) = bytes c0..c0+3 of 32 positions: position 16 (h / 2) + m / 4, byte j = m % 4.
    const int pos = 16 * (h / 2) + m / 4, j = m % 4;
    idx_c4[m] = static_cast<uint8_t>((j >> 1) * 64 + (j & 1) * 32 + pos);
    // Round 2, from (A, B) = 16 positions x 4 bytes each: position 8 (h % 2) + m / 8, byte j = m % 8 (4..7 from B).
    const int pos2 = 8 * (h % 2) + m / 8, j2 = m % 8;
    idx_c8[m] = static_cast<uint8_t>(j2 < 4 ? 4 * pos2 + j2 : 64 + 4 * pos2 + j2 - 4);
  }
  const __m512i i4 = _mm512_load_si512(idx_c4), i8 = _mm512_load_si512(idx_c8);
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t* w = p.w + tile * p.row_bytes * kBinaryTile;
  const int64_t stride = gemm_stride(p);
  alignas(64) uint64_t words[8];   // per row: bytes c0..c0+7
  for (int64_t c0 = 0; c0 < p.row_bytes; c0 += 8) {
    const uint8_t* src = w + c0 * kBinaryTile;
    const __m512i z0 = _mm512_loadu_si512(src), z1 = _mm512_loadu_si512(src + 64);
    const __m512i z2 = _mm512_loadu_si512(src + 128), z3 = _mm512_loadu_si512(src + 192);
    const __m512i a = _mm512_permutex2var_epi8(z0, i4, z1), b = _mm512_permutex2var_epi8(z2, i4, z3);
    _mm512_store_si512(words, _mm512_permutex2var_epi8(a, i8, b));
    for (int r = 0; r < 8; ++r)
      _mm512_store_si512(qrows + r * stride + 8 * c0,
                         _mm512_maskz_mov_epi8(_load_mask64(reinterpret_cast<__mmask64*>(words + r)), ones));
  }
}

bool cpu_has_vbmi() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi");
}

// Binary tiles [tile0, tile1): unpack 8 rows at a time (in L1; without VBMI a tile's 32 rows, in L2), run them.
void gemm_binary_avx512(const Problem& p, const int32_t* xsums, int64_t tile0, int64_t tile1) {
  static const bool vbmi = cpu_has_vbmi();
  AlignedBytes qrows(kBinaryTile * gemm_stride(p));
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    if (!vbmi) {
      unpack_binary_tile(p, tile, qrows.data, gemm_stride(p));
      gemm_rows(p, xsums, qrows.data, tile * kBinaryTile, std::min((tile + 1) * kBinaryTile, p.rows));
      continue;
    }
    for (int h = 0; h < 4; ++h) {   // 8 rows at a time, from the first row of positions 8h on
      const int64_t n0 = tile * kBinaryTile + binary_tile_pos(8 * h);
      if (n0 >= p.rows) continue;
      unpack_binary_rows8_avx512(p, tile, h, qrows.data);
      gemm_rows(p, xsums, qrows.data, n0, std::min(n0 + 8, p.rows));
    }
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

// CPUID leaf 7 EDX bit 25 (AMX-INT8); oneDNN requests the tile state from the OS itself.
bool cpu_has_amx_int8() {
#ifdef QAT_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx >> 25) & 1;
#else
  return false;
#endif
}

// The oneDNN route below runs on any CPU (without AMX oneDNN uses VNNI or AVX2, slowly); tests switch it on here to
// check its unpacking and epilogue on machines without AMX (`int8_gemm_without_amx` in the Python module).
std::atomic<bool> g_int_mm_without_amx{false};   // read by every prefill call, set from Python

// Unpack to int8 codes (rows, padded_k) for the at::_int_mm path: ternary rows [u0, u1), binary tiles [u0, u1).
void unpack_int8(const Problem& p, int8_t* out, int64_t u0, int64_t u1) {
  if (p.bits == 2) {
    for (int64_t n = u0; n < u1; ++n) {
      const uint8_t* wrow = p.w + n * p.row_bytes;
      int8_t* o = out + n * p.padded_k;
      for (int64_t b = 0; b < p.blocks(); ++b)
        for (int plane = 0; plane < 4; ++plane)
          for (int64_t j = 0; j < kBlockBytes; ++j) {   // the layout's definition, in a loop that vectorizes
            const int q = (wrow[b * kBlockBytes + j] >> (2 * plane)) & 3;
            o[(b * 4 + plane) * kBlockBytes + j] = static_cast<int8_t>(q - 1);
          }
    }
    return;
  }
  std::vector<uint8_t> qrows(kBinaryTile * p.padded_k);
  for (int64_t tile = u0; tile < u1; ++tile) {
    unpack_binary_tile(p, tile, qrows.data(), p.padded_k);
    for (int64_t r = 0; r < kBinaryTile && tile * kBinaryTile + r < p.rows; ++r)
      for (int64_t k = 0; k < p.padded_k; ++k)
        out[(tile * kBinaryTile + r) * p.padded_k + k] = static_cast<int8_t>(2 * qrows[r * p.padded_k + k] - 1);
  }
}

// Writes y (tokens, out_features) float32 into `out`; every element is written by every path.
void packed_linear_out(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale, int64_t bits,
                       int64_t in_features, int64_t group_size, const std::string& path, at::Tensor out) {
  TORCH_CHECK(bits == 1 || bits == 2, "packed_linear: bits must be 1 (binary) or 2 (ternary), got ", bits);
  TORCH_CHECK(x.size(-1) == in_features, "packed_linear: input has ", x.size(-1), " features, layer expects ",
              in_features);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 2 && w_scale.is_contiguous(),
              "packed_linear: scale must be contiguous float32 (out_features, groups)");
  const int64_t rows = w_scale.size(0);
  const bool binary = bits == 1;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  (binary ? packed.dim() == 3 && packed.size(0) == (rows + kBinaryTile - 1) / kBinaryTile &&
                                packed.size(2) == kBinaryTile
                          : packed.dim() == 2 && packed.size(0) == rows),
              "packed_linear: packed weight must be contiguous uint8 ",
              binary ? "(ceil(out_features / 32), padded_in / 8, 32)" : "(out_features, padded_in / 4)",
              " for out_features=", rows, ", got ", packed.sizes());
  const int64_t values_per_block = kBlockBytes * (8 / bits);
  const int64_t row_bytes = packed.size(1);
  const int64_t padded_k = row_bytes * (8 / bits);
  TORCH_CHECK(row_bytes % kBlockBytes == 0 && padded_k >= in_features && padded_k - in_features < values_per_block,
              "packed_linear: packed row of ", row_bytes, " bytes does not hold in_features=", in_features);
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
  // Work is split over rows (ternary) or 32-row tiles (binary).
  const int64_t units = binary ? p.tiles() : rows;

  // Part of the avx512_vnni path on CPUs with AMX-INT8: oneDNN's int8 GEMM runs on AMX tiles there. Without AMX
  // it is 5x slower than qat's VNNI GEMM (Sapphire Rapids class, AVX-512 VNNI only), and on AVX2-only CPUs it is
  // a slow reference loop.
  static const bool amx = cpu_has_amx_int8();   // CPUID traps to the hypervisor in a VM: ask once
  const bool int_mm = amx || g_int_mm_without_amx.load(std::memory_order_relaxed);
  if (path == "avx512_vnni" && tokens >= kIntMmMinTokens && groups == 1 && int_mm) {
    // Prefill: compute-bound, so unpack once and let oneDNN's int8 GEMM (AMX/VNNI) do the products.
    at::Tensor w8 = at::empty({rows, padded_k}, packed.options().dtype(at::kChar));
    at::parallel_for(0, units, binary ? 1 : 16, [&](int64_t u0, int64_t u1) {
      unpack_int8(p, w8.data_ptr<int8_t>(), u0, u1);
    });
    at::Tensor xq = at::from_blob(act.codes.data(), {tokens, padded_k}, at::kChar);
    at::Tensor acc = at::_int_mm(xq, w8.t());
    at::Tensor xs = at::from_blob(act.scales.data(), {tokens, 1}, at::kFloat);
    out.view({tokens, rows}).copy_(acc.to(at::kFloat).mul_(w_scale.reshape({1, rows})).div_(xs));
    return;
  }
  // Sums of x per group turn unsigned sums into signed dots; the table lookup yields signed dots directly.
  const bool gemm = path == "avx512_vnni" && tokens >= kGemmMinTokens;
  const bool lut_only = binary && path != "portable" && !gemm && first_lut_token(tokens) == 0;
  const std::vector<int32_t> xsums = lut_only ? std::vector<int32_t>() : group_xsums(p);
  const int32_t* xs = xsums.data();
  std::vector<uint8_t, CacheLineAllocator<uint8_t>> luts;   // binary table lookup: tables of the tokens from
                                                             // first_lut_token on
#ifdef QAT_X86
  static const bool vbmi = cpu_has_vbmi();
  const bool binary_lut = binary && path != "portable" && !gemm;
  const bool vbmi_tables = path == "avx512_vnni" && vbmi;   // then tokens == 1 (2+ take the GEMM)
  const int64_t lut_bytes = padded_k / 4 * kLutBytes;
  const auto build_tables = [&](const int8_t* codes, uint8_t* tables) {
    if (vbmi_tables) build_binary_luts_vnni(codes, padded_k, tables);
    else build_binary_luts_avx2(codes, padded_k, tables);
  };
  // Decode (1 token): every thread builds the token's tables itself, in its own cache, after the fork: built once
  // and shared, the other threads pulled all of them (32 KiB at in_features 4096) from the building core's cache,
  // and the build ran before the fork. 2 threads, 4096x4096 binary, Sapphire Rapids class VM: in cache 68 -> 62 us
  // (avx2) and 61 -> 56 (VBMI), streamed 85 -> 80 and 88 -> 78.
  const bool own_tables = binary_lut && tokens == 1;
  if (path == "avx2" && !binary && tokens >= kGroupTokens) interleave_token_groups(act, tokens, padded_k);
  if (binary_lut && !own_tables) {
    const int64_t first = first_lut_token(tokens);
    luts.resize((tokens - first) * lut_bytes);
    at::parallel_for(first, tokens, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        build_tables(act.codes.data() + t * padded_k, luts.data() + (t - first) * lut_bytes);
    });
  }
#endif
  at::parallel_for(0, units, binary ? 1 : 8, [&](int64_t u0, int64_t u1) {
#ifdef QAT_X86
    if (gemm) {
      if (binary) return gemm_binary_avx512(p, xs, u0, u1);
      return gemm_ternary_avx512(p, xs, u0, u1);
    }
    const uint8_t* tables = luts.data();
    if (own_tables) {
      thread_local std::vector<uint8_t, CacheLineAllocator<uint8_t>> thread_tables;
      thread_tables.resize(lut_bytes);
      build_tables(act.codes.data(), thread_tables.data());
      tables = thread_tables.data();
    }
    if (binary && path == "avx512_vnni" && p.tokens == 1 && vbmi) return binary_tiles_vbmi(p, tables, u0, u1);
    if (binary_lut) {
      binary_tiles_avx2(p, xs, tables, u0, u1);
      return;
    }
    if (path == "avx512_vnni") return ternary_rows_simd<true>(p, xs, u0, u1);
    if (path == "avx2") return ternary_rows_simd<false>(p, xs, u0, u1);
#endif
    if (binary) rows_portable(p, xs, u0 * kBinaryTile, std::min(u1 * kBinaryTile, rows));
    else rows_portable(p, xs, u0, u1);
  });
}

// Functional form for the model's forward: allocates y, shaped like x with out_features last, in x's dtype (one
// dispatcher call instead of allocating, calling and reshaping from Python: ~15 us less per layer).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale, int64_t bits,
                         int64_t in_features, int64_t group_size, const std::string& path) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "packed_linear: input has ", x.size(-1),
              " features, layer expects ", in_features);
  const int64_t rows = w_scale.size(0);
  at::Tensor out = at::empty({x.numel() / in_features, rows}, x.options().dtype(at::kFloat));
  packed_linear_out(x, packed, w_scale, bits, in_features, group_size, path, out);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = rows;
  return out.view(sizes).to(x.scalar_type());
}

// ---------------------------------------------------------------- fp32 GEMV for the full-precision head
// Decode's one token through a kept-full-precision layer (lm_head: 32000 x 1536 fp32 = 197 MB per token, more bytes
// than all packed layers of a 700M model together) is a pure memory stream. torch's fp32 GEMV reaches 55-75% of
// the read bandwidth here (bench/kernels.py); 4 rows at a time, each row prefetched 4 KiB ahead, reaches ~90%. The 4
// rows are a quarter of the thread's rows apart (4 streams in different pages, as the packed decode reads): against 4
// adjacent rows (one stream), 17.5-19.4 -> 20.6-22.3 GB/s for 32000 x 1536 and 16.3-19.7 -> 16.2-21.7 for 32000 x
// 2048, in turns in one process on Zen 3 (2 threads; a 384 MB sum read 17-22.5 GB/s meanwhile). Sums are exact fp32
// FMAs in another order than torch's (differences ~1e-7 relative).
constexpr int64_t kGemvRows = 4;

__attribute__((target("avx2,fma"))) inline float hsum_ps_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int RR>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const float* w, const float* x, float* y, int64_t k,
                                                       int64_t n0, int64_t spread = 1) {
  __m256 acc[RR][2];
  for (int r = 0; r < RR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int r = 0; r < RR; ++r) {
      const float* row = w + (n0 + r * spread) * k + i;
      _mm_prefetch(reinterpret_cast<const char*>(row + 1024), _MM_HINT_T0);   // 4 KiB ahead in this row
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(row), x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), x1, acc[r][1]);
    }
  }
  for (int r = 0; r < RR; ++r) {
    const float* row = w + (n0 + r * spread) * k;
    float sum = hsum_ps_avx2(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t j = i; j < k; ++j) sum += row[j] * x[j];
    y[n0 + r * spread] = sum;
  }
}

// y = W x for one token: x float32 with k elements (any leading shape of size 1), W float32 (n, k) contiguous.
// `path`: "portable" runs the plain loop, the SIMD paths the AVX2 code.
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight, const std::string& path) {
  TORCH_CHECK(cpu_has(path), "dense_gemv: this CPU cannot run the '", path, "' path");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous(),
              "dense_gemv: weight must be a contiguous float32 (out_features, in_features) tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == k && x.numel() == k,
              "dense_gemv: input must be one float32 token of ", k, " features, got ", x.sizes());
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xv = xc.data_ptr<float>();
  float* out = y.data_ptr<float>();
#ifdef QAT_X86
  if (path != "portable" && cpu_has("avx2")) {
    at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
      const int64_t spread = (n1 - n0) / kGemvRows;
      for (int64_t r = n0; r < n0 + spread; ++r) gemv_rows_avx2<kGemvRows>(w, xv, out, k, r, spread);
      for (int64_t r = n0 + kGemvRows * spread; r < n1; ++r) gemv_rows_avx2<1>(w, xv, out, k, r);
    });
    return y;
  }
#endif
  at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r) {
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += w[r * k + j] * xv[j];
      out[r] = sum;
    }
  });
  return y;
}

// ---------------------------------------------------------------- Q8_0 int8 head
// The optional int8 lm_head of the packed decoder (qat/nn/packed_linear.py Q8_0Linear): GGML Q8_0 weights (int8
// codes, one fp16 scale per block of 32 inputs; 1.06 bytes per weight against fp32's 4) times activations quantized
// the same way per token and block (qat/quant/q8_0.py), as llama.cpp's Q8_0 x Q8_0 dot products:
// y = sum_blocks (x_codes . w_codes) * d_w * d_x. torch has no op for per-block scales (its int8 ops take one scale
// per row or tensor), hence this kernel. Weights are in the interleaved chunk layout of qat/pack/kernel_layout.py:
// one 64-byte load holds 4 values of each of 16 blocks, so 32-bit lane j of a vpdpbusd accumulator is block j's dot.
// vpdpbusd multiplies unsigned by signed bytes: |x| is the unsigned side and x's sign moves onto the weight codes
// (codes are in [-127, 127], so negating never overflows). Integer dots are exact; each block's dot is scaled in
// fp32 and summed in fp32 (lane order differs between paths, ~1e-7 relative).
constexpr int64_t kQ8Block = 32;
constexpr int64_t kQ8ChunkBlocks = 16;
constexpr int64_t kQ8Chunk = kQ8Block * kQ8ChunkBlocks;

struct Q8Activations {
  int64_t padded_k = 0;
  std::vector<int8_t> codes;    // (tokens, padded_k) in the interleaved chunk layout, zero-padded
  std::vector<uint8_t> abs;     // |codes|
  std::vector<uint64_t> neg;    // (tokens, padded_k / 64): bit b of word g set where codes[64 g + b] < 0
  std::vector<float> d;         // (tokens, padded_k / 32) block scales, 0 in the padding

  const int8_t* token_codes(int64_t t) const { return codes.data() + t * padded_k; }
  const uint8_t* token_abs(int64_t t) const { return abs.data() + t * padded_k; }
  const uint64_t* token_neg(int64_t t) const { return neg.data() + t * (padded_k / 64); }
  const float* token_d(int64_t t) const { return d.data() + t * (padded_k / kQ8Block); }
};

// Position of input element e in the interleaved chunk layout (inverse of qat/pack/kernel_layout.py unpack_q8_0).
inline int64_t q8_position(int64_t e) {
  const int64_t chunk = e / kQ8Chunk, block = (e % kQ8Chunk) / kQ8Block, v = e % kQ8Block;
  return chunk * kQ8Chunk + 4 * (kQ8ChunkBlocks * (v / 4) + block) + v % 4;
}

template <typename scalar_t>
void quantize_q8_tokens(const scalar_t* x, int64_t tokens, int64_t k, int64_t padded_k, Q8Activations& a) {
  const int64_t blocks = padded_k / kQ8Block;
  a.padded_k = padded_k;
  a.codes.assign(tokens * padded_k, 0);
  a.abs.assign(tokens * padded_k, 0);
  a.neg.assign(tokens * (padded_k / 64), 0);
  a.d.assign(tokens * blocks, 0.f);
  at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* row = x + t * k;
      int8_t* codes = a.codes.data() + t * padded_k;
      for (int64_t b = 0; b * kQ8Block < k; ++b) {
        const int64_t e0 = b * kQ8Block, e1 = std::min(k, e0 + kQ8Block);
        float amax = 0.f;
        for (int64_t e = e0; e < e1; ++e) amax = std::max(amax, std::fabs(static_cast<float>(row[e])));
        // The fp32 operations of quantize_q8_0: d = amax / 127, codes = round-half-even(x * (1 / d)).
        const float d = amax / 127.f;
        const float inverse = d > 0.f ? 1.f / d : 0.f;
        for (int64_t e = e0; e < e1; ++e) {
          float c = (static_cast<float>(row[e]) * inverse + 12582912.0f) - 12582912.0f;   // see quantize_tokens
          codes[q8_position(e)] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, c)));
        }
        a.d[t * blocks + b] = d;
      }
      uint8_t* abs = a.abs.data() + t * padded_k;
      uint64_t* neg = a.neg.data() + t * (padded_k / 64);
      for (int64_t i = 0; i < padded_k; ++i) {
        abs[i] = static_cast<uint8_t>(std::abs(static_cast<int>(codes[i])));
        if (codes[i] < 0) neg[i / 64] |= uint64_t{1} << (i % 64);
      }
    }
  });
}

// Rows [n0, n1) x every token: the row (padded_k bytes) stays in L1 while the tokens pass over it.
void q8_rows_portable(const int8_t* w, const at::Half* w_d, const Q8Activations& a, int64_t tokens, int64_t rows,
                      int64_t n0, int64_t n1, float* y) {
  const int64_t padded_k = a.padded_k, blocks = padded_k / kQ8Block;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = w + n * padded_k;
    for (int64_t t = 0; t < tokens; ++t) {
      const int8_t* x = a.token_codes(t);
      const float* xd = a.token_d(t);
      float lanes[kQ8ChunkBlocks] = {};
      for (int64_t c = 0; c < padded_k / kQ8Chunk; ++c)
        for (int64_t j = 0; j < kQ8ChunkBlocks; ++j) {
          int32_t dot = 0;
          for (int64_t i = 0; i < 8; ++i)
            for (int64_t b = 0; b < 4; ++b) {
              const int64_t pos = c * kQ8Chunk + 4 * (kQ8ChunkBlocks * i + j) + b;
              dot += static_cast<int32_t>(wrow[pos]) * static_cast<int32_t>(x[pos]);
            }
          const int64_t block = c * kQ8ChunkBlocks + j;
          lanes[j] += static_cast<float>(dot) * (static_cast<float>(w_d[n * blocks + block]) * xd[block]);
        }
      float sum = 0.f;
      for (float v : lanes) sum += v;
      y[t * rows + n] = sum;
    }
  }
}

#ifdef QAT_X86
// RR rows `spread` apart from n0 times token t. A thread's decode (one token) takes 4 rows a quarter of its range
// apart, 4 weight streams in different pages (as dense_gemv and the packed decode read; 1 row at a time was one
// stream), each x load serving the 4; the arithmetic per row is the 1-row loop's, so outputs are bit-identical.
// In turns in one process on Zen 3 (2 threads, 2 copies alternated): 32000 x 1536 3.03-3.60 -> 2.41-2.52 ms
// (20.7-21.6 GB/s), 32000 x 2048 3.38-4.01 -> 2.74-3.08 ms.
template <int RR>
__attribute__((target("avx2,fma,f16c"))) void q8_tile_avx2(const int8_t* w, const at::Half* w_d, const Q8Activations& a,
                                                           int64_t t, int64_t rows, int64_t n0, int64_t spread,
                                                           float* y) {
  const int64_t padded_k = a.padded_k, blocks = padded_k / kQ8Block;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x = a.token_codes(t);
  const uint8_t* xabs = a.token_abs(t);
  const float* xd = a.token_d(t);
  __m256 acc[RR][2];
  for (int r = 0; r < RR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < padded_k / kQ8Chunk; ++c)
    for (int h = 0; h < 2; ++h) {   // blocks 0-7, then 8-15 of the chunk
      __m256i dot[RR];
      for (int r = 0; r < RR; ++r) dot[r] = _mm256_setzero_si256();
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t pos = c * kQ8Chunk + 64 * i + 32 * h;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + pos));
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xabs + pos));
        for (int r = 0; r < RR; ++r) {
          const int8_t* wrow = w + (n0 + r * spread) * padded_k;
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + pos));
          // |x| * (w with x's sign): pairs sum to at most 2 * 127 * 127 < 2^15, so vpmaddubsw never saturates.
          const __m256i pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xv));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs, ones));
        }
      }
      const int64_t block = c * kQ8ChunkBlocks + 8 * h;
      const __m256 xs = _mm256_loadu_ps(xd + block);
      for (int r = 0; r < RR; ++r) {
        const uint16_t* drow = reinterpret_cast<const uint16_t*>(w_d) + (n0 + r * spread) * blocks;
        const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(drow + block)));
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(wd, xs), acc[r][h]);
      }
    }
  for (int r = 0; r < RR; ++r) y[t * rows + n0 + r * spread] = hsum_ps_avx2(_mm256_add_ps(acc[r][0], acc[r][1]));
}

void q8_rows_avx2(const int8_t* w, const at::Half* w_d, const Q8Activations& a, int64_t tokens, int64_t rows,
                  int64_t n0, int64_t n1, float* y) {
  if (tokens == 1) {
    const int64_t spread = (n1 - n0) / 4;
    for (int64_t n = n0; n < n0 + spread; ++n) q8_tile_avx2<4>(w, w_d, a, 0, rows, n, spread, y);
    for (int64_t n = n0 + 4 * spread; n < n1; ++n) q8_tile_avx2<1>(w, w_d, a, 0, rows, n, 0, y);
    return;
  }
  for (int64_t n = n0; n < n1; ++n)   // the row stays in L1 while the tokens pass over it
    for (int64_t t = 0; t < tokens; ++t) q8_tile_avx2<1>(w, w_d, a, t, rows, n, 0, y);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void q8_rows_avx512(const int8_t* w, const at::Half* w_d,
                                                                           const Q8Activations& a, int64_t tokens,
                                                                           int64_t rows, int64_t n0, int64_t n1,
                                                                           float* y) {
  const int64_t padded_k = a.padded_k, blocks = padded_k / kQ8Block;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = w + n * padded_k;
    const uint16_t* drow = reinterpret_cast<const uint16_t*>(w_d) + n * blocks;
    for (int64_t t = 0; t < tokens; ++t) {
      const uint8_t* xabs = a.token_abs(t);
      const uint64_t* neg = a.token_neg(t);
      const float* xd = a.token_d(t);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < padded_k / kQ8Chunk; ++c) {
        __m512i dot = _mm512_setzero_si512();                  // lane j: block j of the chunk
        for (int64_t i = 0; i < 8; ++i) {
          const int64_t pos = c * kQ8Chunk + 64 * i;
          __m512i wv = _mm512_loadu_si512(wrow + pos);
          wv = _mm512_mask_sub_epi8(wv, static_cast<__mmask64>(neg[pos / 64]), zero, wv);
          dot = _mm512_dpbusd_epi32(dot, _mm512_loadu_si512(xabs + pos), wv);
        }
        const int64_t block = c * kQ8ChunkBlocks;
        const __m512 wd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(drow + block)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd, _mm512_loadu_ps(xd + block)), acc);
      }
      y[t * rows + n] = _mm512_reduce_add_ps(acc);
    }
  }
}
#endif  // QAT_X86

// x (..., in_features) float -> (..., rows) float32; qweight int8 (rows, padded_k) in the interleaved chunk layout,
// scale fp16 (rows, padded_k / 32).
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, int64_t in_features,
                       const std::string& path) {
  TORCH_CHECK(cpu_has(path), "q8_0_linear: this CPU cannot run the '", path, "' path");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.size(1) % kQ8Chunk == 0 && in_features <= qweight.size(1),
              "q8_0_linear: qweight must be contiguous int8 (out_features, in_features padded to ", kQ8Chunk,
              "), got ", qweight.sizes());
  const int64_t rows = qweight.size(0), padded_k = qweight.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == rows && scale.size(1) == padded_k / kQ8Block,
              "q8_0_linear: scale must be contiguous float16 (out_features, padded in_features / 32), got ",
              scale.sizes());
  TORCH_CHECK(x.size(-1) == in_features, "q8_0_linear: input has ", x.size(-1), " features, expected ", in_features);
  const at::Tensor xc = x.contiguous();
  const int64_t tokens = xc.numel() / in_features;
  Q8Activations act;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "q8_0_linear", [&] {
    quantize_q8_tokens(xc.data_ptr<scalar_t>(), tokens, in_features, padded_k, act);
  });
  at::Tensor out = at::empty({tokens, rows}, xc.options().dtype(at::kFloat));
  const int8_t* w = qweight.data_ptr<int8_t>();
  const at::Half* w_d = scale.data_ptr<at::Half>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t n0, int64_t n1) {
#ifdef QAT_X86
    if (path == "avx512_vnni") return q8_rows_avx512(w, w_d, act, tokens, rows, n0, n1, y);
    if (path == "avx2") return q8_rows_avx2(w, w_d, act, tokens, rows, n0, n1, y);
#endif
    q8_rows_portable(w, w_d, act, tokens, rows, n0, n1, y);
  });
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = rows;
  return out.view(sizes).to(x.scalar_type());
}

bool cpu_supports(const std::string& path) { return cpu_has(path); }

// The decoder's RMSNorm (qat.kernels.packed_linear.rms_norm) of each row of x_and_floor (tokens, n + 1: a row
// followed by its floor sqrt(n * eps)) into out (tokens, n): x / |row| * w, the 2-norm over the whole row.
void rms_norm_rows(const at::Tensor& x_and_floor, const float* w, int64_t n, float* out) {
  const int64_t tokens = x_and_floor.size(0), stride = x_and_floor.stride(0);
  const float* x = x_and_floor.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * stride;
    // 8 partial sums in double, so the loop vectorizes and the norm is correctly rounded to fp32 for any n here
    // (torch's fp32 reduction is within an ulp of it: a code at a rounding boundary can move by one step).
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n + 1; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(row[i + j]) * row[i + j];
    for (; i < n + 1; ++i) part[0] += static_cast<double>(row[i]) * row[i];
    const float norm = static_cast<float>(std::sqrt(((part[0] + part[1]) + (part[2] + part[3])) +
                                                    ((part[4] + part[5]) + (part[6] + part[7]))));
    float* y = out + t * n;
    for (i = 0; i < n; ++i) y[i] = (row[i] / norm) * w[i];   // torch.div, then mul_: the same two roundings
  }
}

// packed_linear_out with the weight's arguments bound once, called from Python through pybind11: a torch.ops call
// boxes its 8 arguments into IValues and unboxes them again, ~2 us per call (measured: 3.7 us for a 512-wide
// matmul through torch.ops, 1.4 us bound) -- a decode step makes ~4 per layer. The op stays the public,
// torch.compile-visible entry; this is the eager decode loop's (qat.nn.decoder via bind_packed_linear).
//
// With a norm weight it first applies rms_norm_rows to its input, x (tokens, in_features + 1): every matmul input
// of a BitNet decoder layer is such a norm's output, and its 3 aten ops took 15-35 us a norm (measured in a 700M
// decode step and alone, Zen 3), this loop a few us. Its epilogues, in this order, replace the aten ops that followed
// each matmul of a layer (2-5 us each in a decode step): `bias` is added; `gated` (kSiLU, kReLU2) takes the output's
// halves as up and gate (the fused up/gate matmul) and leaves act(gate) * up in the gate half, with torch's formulas
// and roundings (F.silu: g / (1 + exp(-g)); relu(g) squared) up to exp's last 2 bits (exp_avx2); `residual` adds the
// result to out (the residual stream) instead of writing it.
enum GatedActivation : int64_t { kNone = 0, kSiLU = 1, kReLU2 = 2 };

// exp(x) for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial, times 2^n applied as two
// halves so that n may run from -150 to 128): within 2 ulp of the true value, overflowing to inf past 88.72 and
// rounding through the subnormals to 0 near -104 like glibc's expf; NaN stays NaN (max/min return their second operand
// on NaN). glibc's expf one value at a time made the SiLU epilogue cost ~28 us per 8192-wide up/gate output against
// ~19 us for torch's vectorized silu_ + mul_ (Zen 3); this one ~5 us.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp_avx2(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);   // ln2 in two parts: n * hi is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, first), second);
}

__attribute__((target("avx2,fma"))) void silu_product_avx2(const float* up, float* gate, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sigmoid_den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g)));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, sigmoid_den), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// p[j] = exp(p[j] - top) for j < n, returning their sum: a softmax's numerators (decode attention, one query head).
__attribute__((target("avx2,fma"))) float softmax_numerators_avx2(float* p, int64_t n, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + j), shift));
    _mm256_storeu_ps(p + j, e);
    sums = _mm256_add_ps(sums, e);
  }
  float sum = hsum_ps_avx2(sums);
  for (; j < n; ++j) sum += p[j] = std::exp(p[j] - top);
  return sum;
}

// simd: the kernel path is avx2 or avx512_vnni (both have AVX2 and FMA); portable computes glibc's expf per value
void gated_product(float* y, int64_t tokens, int64_t width, int64_t act, bool simd) {
  const int64_t half = width / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* up = y + t * width;
    float* gate = y + t * width + half;
    if (act == kSiLU && simd) {
      silu_product_avx2(up, gate, half);
      continue;
    }
    for (int64_t i = 0; i < half; ++i) {
      const float g = gate[i];
      const float r = g > 0.0f ? g : 0.0f;
      gate[i] = (act == kSiLU ? g / (1.0f + std::exp(-g)) : r * r) * up[i];
    }
  }
}

struct BoundPackedLinear {
  at::Tensor packed, scale, norm_weight, bias;   // undefined: no norm, no bias
  int64_t bits, in_features, group_size;
  std::string path;
  bool residual;
  int64_t gated;
  void operator()(const at::Tensor& x, at::Tensor out) const {
    at::Tensor input = x;
    if (norm_weight.defined()) {
      TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == in_features + 1 && x.stride(1) == 1,
                  "packed_linear with RMSNorm: input must be float32 (tokens, ", in_features + 1,
                  ") with unit column stride (each row followed by its floor), got ", x.scalar_type(), " ", x.sizes());
      thread_local std::vector<float> normed;
      normed.resize(x.size(0) * in_features);
      rms_norm_rows(x, norm_weight.data_ptr<float>(), in_features, normed.data());
      input = at::from_blob(normed.data(), {x.size(0), in_features}, x.options());
    }
    if (!residual && gated == kNone && !bias.defined()) return packed_linear_out(input, packed, scale, bits, in_features, group_size,
                                                              path, std::move(out));
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2,
                "packed_linear with an epilogue: out must be contiguous float32 (tokens, out_features), got ",
                out.sizes());
    at::Tensor y = out;
    thread_local std::vector<float> result;
    if (residual) {
      result.resize(out.numel());
      y = at::from_blob(result.data(), out.sizes(), out.options());
    }
    packed_linear_out(input, packed, scale, bits, in_features, group_size, path, y);
    if (bias.defined()) {
      float* yp = y.data_ptr<float>();
      const float* b = bias.data_ptr<float>();
      for (int64_t t = 0; t < out.size(0); ++t)
        for (int64_t i = 0; i < out.size(1); ++i) yp[t * out.size(1) + i] += b[i];
    }
    if (gated != kNone) gated_product(y.data_ptr<float>(), out.size(0), out.size(1), gated, path != "portable");
    if (residual) {
      float* o = out.data_ptr<float>();
      for (int64_t i = 0; i < out.numel(); ++i) o[i] += result[i];
    }
  }
};

// The decoder's attention of one new position (qat.nn.decoder.decode_attention_torch is its definition), bound to a
// static KV cache and its RoPE table, called from Python once per layer and step: torch took 5 ops (RoPE's complex
// multiply, the cache copy, bmm, softmax, bmm) and 3 views per layer, 60-90 us a layer in a 700M decode step (Zen 3),
// each op's dispatch costing more than its arithmetic at these sizes.
// Layouts: qkv (1, (heads + 2 kv_heads) * d): q heads, k heads, v heads, each head's dims in RoPE's pair order
// (adjacent values rotate together); kv_cache (layers, 2, kv_heads, max_len, d), keys then values; rope
// (max_len, d / 2, 2): cos and sin (scaled) of each position and frequency; out (1, heads * d).
struct BoundDecodeAttention {
  at::Tensor rope, kv_cache;
  int64_t layers, kv_heads, max_len, d;
  bool simd;   // the softmax's exp: exp_avx2 on the SIMD paths, glibc's expf per value on portable

  BoundDecodeAttention(at::Tensor rope_, at::Tensor kv_cache_, const std::string& path)
      : rope(std::move(rope_)), kv_cache(std::move(kv_cache_)), simd(path != "portable") {
    TORCH_CHECK(cpu_has(path), "decode attention: this CPU cannot run the '", path, "' path");
    TORCH_CHECK(kv_cache.scalar_type() == at::kFloat && kv_cache.dim() == 5 && kv_cache.size(1) == 2 &&
                    kv_cache.is_contiguous() && kv_cache.size(4) % 2 == 0,
                "decode attention: kv_cache must be contiguous float32 (layers, 2, kv_heads, max_len, head_dim) "
                "with an even head_dim, got ", kv_cache.scalar_type(), " ", kv_cache.sizes());
    layers = kv_cache.size(0), kv_heads = kv_cache.size(2), max_len = kv_cache.size(3), d = kv_cache.size(4);
    TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.numel() == max_len * d,
                "decode attention: rope must be contiguous float32 (max_len=", max_len, ", head_dim / 2, 2), got ",
                rope.scalar_type(), " ", rope.sizes());
  }

  void operator()(at::Tensor qkv, int64_t layer, int64_t position, at::Tensor out) const {
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == 1 && out.stride(1) == 1 &&
                    out.size(1) % (kv_heads * d) == 0,
                "decode attention: out must be float32 (1, heads * head_dim) with unit stride, heads a multiple of "
                "kv_heads=", kv_heads, ", got ", out.sizes());
    const int64_t heads = out.size(1) / d, groups = heads / kv_heads;
    TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.is_contiguous() &&
                    qkv.numel() == (heads + 2 * kv_heads) * d,
                "decode attention: qkv must be contiguous float32 (1, ", (heads + 2 * kv_heads) * d, "), got ",
                qkv.sizes());
    TORCH_CHECK(0 <= layer && layer < layers && 0 <= position && position < max_len,
                "decode attention: layer ", layer, " / position ", position, " outside the cache's ", layers,
                " layers / ", max_len, " positions");
    float* v = qkv.data_ptr<float>();
    const float* cs = rope.data_ptr<float>() + position * d;
    // RoPE as torch's complex multiply rounds it: (a + ib)(c + is) = (ac - bs) + i(as + bc).
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      float* p = v + h * d;
      for (int64_t i = 0; i < d; i += 2) {
        const float a = p[i], b = p[i + 1], c = cs[i], s = cs[i + 1];
        p[i] = a * c - b * s;
        p[i + 1] = a * s + b * c;
      }
    }
    float* keys = kv_cache.data_ptr<float>() + layer * 2 * kv_heads * max_len * d;   // (kv_heads, max_len, d)
    float* values = keys + kv_heads * max_len * d;
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::memcpy(keys + (g * max_len + position) * d, v + (heads + g) * d, d * sizeof(float));
      std::memcpy(values + (g * max_len + position) * d, v + (heads + kv_heads + g) * d, d * sizeof(float));
    }
    const int64_t length = position + 1;
    float* y = out.data_ptr<float>();
    // Threads only where a chunk of heads is worth a wake-up (a few us): ~16k multiply-adds each.
    const int64_t grain = std::max<int64_t>(1, 16384 / (length * d));
    at::parallel_for(0, heads, grain, [&](int64_t h0, int64_t h1) {
      std::vector<float> p(length);
      for (int64_t h = h0; h < h1; ++h) {
        const float* q = v + h * d;
        const float* k = keys + (h / groups) * max_len * d;
        const float* vals = values + (h / groups) * max_len * d;
        float top = -INFINITY;
        for (int64_t j = 0; j < length; ++j) {
          float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};   // 8 partial sums: the loop vectorizes
          const float* kj = k + j * d;
          int64_t i = 0;
          for (; i + 8 <= d; i += 8)
            for (int l = 0; l < 8; ++l) part[l] += q[i + l] * kj[i + l];
          for (; i < d; ++i) part[0] += q[i] * kj[i];
          p[j] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
          top = std::max(top, p[j]);
        }
        float sum = 0;
        if (simd) {
          sum = softmax_numerators_avx2(p.data(), length, top);
        } else {
          for (int64_t j = 0; j < length; ++j) sum += p[j] = std::exp(p[j] - top);
        }
        const float inv = 1.0f / sum;
        float* o = y + h * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t j = 0; j < length; ++j) {
          const float w = p[j] * inv;
          const float* vj = vals + j * d;
          for (int64_t i = 0; i < d; ++i) o[i] += w * vj[i];
        }
      }
    });
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<BoundDecodeAttention>(m, "BoundDecodeAttention")
      .def(pybind11::init<at::Tensor, at::Tensor, std::string>(), pybind11::arg("rope"), pybind11::arg("kv_cache"),
           pybind11::arg("path"))
      .def("__call__", &BoundDecodeAttention::operator(), pybind11::arg("qkv"), pybind11::arg("layer"),
           pybind11::arg("position"), pybind11::arg("out"), pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<BoundPackedLinear>(m, "BoundPackedLinear")
      .def(pybind11::init([](at::Tensor packed, at::Tensor scale, int64_t bits, int64_t in_features,
                             int64_t group_size, std::string path, std::optional<at::Tensor> norm_weight,
                             std::optional<at::Tensor> bias, bool residual, std::string gated_activation) {
             at::Tensor norm;
             if (norm_weight) {
               norm = norm_weight->contiguous();
               TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.numel() == in_features,
                           "BoundPackedLinear: norm_weight must be float32 of in_features=", in_features,
                           " values, got ", norm.scalar_type(), " ", norm.sizes());
             }
             const int64_t gated = gated_activation.empty()       ? kNone
                                   : gated_activation == "silu"  ? kSiLU
                                   : gated_activation == "relu2" ? kReLU2
                                                                 : -1;
             TORCH_CHECK(gated >= 0, "BoundPackedLinear: gated_activation must be '', 'silu' or 'relu2', got '",
                         gated_activation, "'");
             at::Tensor bias_values;
             if (bias) {
               bias_values = bias->contiguous();
               TORCH_CHECK(bias_values.scalar_type() == at::kFloat && bias_values.numel() == scale.size(0),
                           "BoundPackedLinear: bias must be float32 of out_features=", scale.size(0), " values, got ",
                           bias_values.scalar_type(), " ", bias_values.sizes());
             }
             return BoundPackedLinear{std::move(packed), std::move(scale), std::move(norm), std::move(bias_values), bits,
                                      in_features, group_size, std::move(path), residual, gated};
           }),
           pybind11::arg("packed"), pybind11::arg("scale"), pybind11::arg("bits"), pybind11::arg("in_features"),
           pybind11::arg("group_size"), pybind11::arg("path"), pybind11::arg("norm_weight") = pybind11::none(),
           pybind11::arg("bias") = pybind11::none(), pybind11::arg("residual") = false, pybind11::arg("gated_activation") = "")
      .def("__call__", &BoundPackedLinear::operator(), pybind11::arg("x"), pybind11::arg("out"),
           pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cpu_has_amx_int8", &cpu_has_amx_int8, "Whether the CPU has AMX-INT8 (avx512_vnni prefill then runs oneDNN).");
  m.def(
      "int8_gemm_without_amx", [](bool on) { g_int_mm_without_amx.store(on, std::memory_order_relaxed); },
      pybind11::arg("on"),
      "Tests: route avx512_vnni prefill (>= 32 tokens, row/tensor scales) through oneDNN's int8 GEMM as on AMX CPUs.");
}

TORCH_LIBRARY(qat_kernels, m) {
  m.def("packed_linear_out(Tensor x, Tensor packed, Tensor scale, int bits, int in_features, int group_size, "
        "str path, Tensor(a!) out) -> ()");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor scale, int bits, int in_features, int group_size, "
        "str path) -> Tensor");
  m.def("dense_gemv(Tensor x, Tensor weight, str path) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor qweight, Tensor scale, int in_features, str path) -> Tensor");
  m.def("cpu_supports(str path) -> bool", &cpu_supports);
}

TORCH_LIBRARY_IMPL(qat_kernels, CPU, m) {
  m.impl("packed_linear_out", &packed_linear_out);
  m.impl("packed_linear", &packed_linear);
  m.impl("dense_gemv", &dense_gemv);
  m.impl("q8_0_linear", &q8_0_linear);
}
