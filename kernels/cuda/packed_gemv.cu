// CUDA packed GEMV for decode: int8 activation codes x 2-bit ternary / 1-bit binary weights, dp4a.
//
// Same weight layouts as the CPU kernels (qat/pack/kernel_layout.py).
// - Ternary: per row, 64-byte blocks; element 64 * plane + j of a block sits in byte j, bits [2 plane, 2 plane + 2),
//   stored as q = code + 1. One warp per output row: a thread reads 4 bytes (one uint32) of a block; `(w >> 2 plane)
//   & 0x03030303` gives 4 unsigned codes in the byte lanes that line up with 4 contiguous activations, so one
//   __dp4a does 4 products (bitnet.cpp's W2A8 GEMV idea, without its interleave since the layout is plane-major);
//   dot = sum(q x) - sum(x).
// - Binary: 32-row tiles; byte c of a row (columns 8c..8c+7, bit i = column 8c + i, b = (code + 1) / 2) sits at
//   position p of the tile's 32-byte column c. One warp per tile, lane p owns row BINARY_TILE_ROWS[p]: the warp's
//   32 byte loads of column c are one coalesced 32-byte sector; each nibble is spread to 4 bytes for a __dp4a with
//   4 activations; dot = 2 sum(b x) - sum(x).
// x codes (padded to whole blocks with zeros), their per-token sums and scales come from the host (the activation
// quantizer of qat/quant/activation.py). Per-tensor/row scale (groups == 1).

#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kBlockBytes = 64;
constexpr int kWarp = 32;
constexpr int kBinaryTile = 32;

__global__ void ternary_gemv_kernel(const int8_t* __restrict__ x, const int32_t* __restrict__ x_sum,
                                    const float* __restrict__ x_scale, const uint8_t* __restrict__ w,
                                    const float* __restrict__ w_scale, float* __restrict__ y, int rows,
                                    int row_bytes, int tokens) {
  constexpr int planes = 4;
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int token = blockIdx.y;
  if (row >= rows || token >= tokens) return;
  const int padded_k = row_bytes * planes;
  const uint32_t* wrow = reinterpret_cast<const uint32_t*>(w + static_cast<int64_t>(row) * row_bytes);
  const int8_t* xt = x + static_cast<int64_t>(token) * padded_k;
  int acc = 0;
  // Word i of the row: block i / 16, bytes 4 * (i % 16) .. + 3 of that block.
  for (int i = lane; i < row_bytes / 4; i += kWarp) {
    const uint32_t word = __ldg(wrow + i);
    const int block = i / (kBlockBytes / 4);
    const int byte = 4 * (i % (kBlockBytes / 4));
#pragma unroll
    for (int plane = 0; plane < planes; ++plane) {
      const int q = static_cast<int>((word >> (plane * 2)) & 0x03030303u);
      const int xv = *reinterpret_cast<const int*>(xt + (block * planes + plane) * kBlockBytes + byte);
      acc = __dp4a(q, xv, acc);
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    const int dot = acc - x_sum[token];
    y[static_cast<int64_t>(token) * rows + row] = static_cast<float>(dot) * w_scale[row] / x_scale[token];
  }
}

// 4 bits -> 4 bytes of 0/1 (bit i in byte i), the unsigned operand of dp4a.
__device__ __forceinline__ int spread_nibble(uint32_t n) {
  return static_cast<int>((n & 1u) | ((n & 2u) << 7) | ((n & 4u) << 14) | ((n & 8u) << 21));
}

__global__ void binary_tile_gemv_kernel(const int8_t* __restrict__ x, const int32_t* __restrict__ x_sum,
                                        const float* __restrict__ x_scale, const uint8_t* __restrict__ w,
                                        const float* __restrict__ w_scale, float* __restrict__ y, int rows,
                                        int row_bytes, int tokens) {
  const int tile = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int pos = threadIdx.x % kWarp;
  const int token = blockIdx.y;
  if (tile * kBinaryTile >= rows || token >= tokens) return;
  const int row = tile * kBinaryTile + (pos < 8 ? pos : pos < 16 ? pos + 8 : pos < 24 ? pos - 8 : pos);
  const uint8_t* wt = w + static_cast<int64_t>(tile) * row_bytes * kBinaryTile + pos;
  const int8_t* xt = x + static_cast<int64_t>(token) * row_bytes * 8;
  int acc = 0;
#pragma unroll 4
  for (int c = 0; c < row_bytes; ++c) {
    const uint32_t bits = __ldg(wt + c * kBinaryTile);
    const int2 xv = *reinterpret_cast<const int2*>(xt + 8 * c);   // activations 8c .. 8c + 7
    acc = __dp4a(spread_nibble(bits & 15u), xv.x, acc);
    acc = __dp4a(spread_nibble(bits >> 4), xv.y, acc);
  }
  if (row < rows) {
    const int dot = 2 * acc - x_sum[token];
    y[static_cast<int64_t>(token) * rows + row] = static_cast<float>(dot) * w_scale[row] / x_scale[token];
  }
}

}  // namespace

// Host launcher (device pointers). Returns the launch status.
extern "C" cudaError_t qat_packed_gemv(const int8_t* x, const int32_t* x_sum, const float* x_scale,
                                       const uint8_t* w, const float* w_scale, float* y, int rows, int row_bytes,
                                       int tokens, int bits, cudaStream_t stream) {
  constexpr int warps_per_block = 8;
  const dim3 block(warps_per_block * kWarp);
  if (bits == 2) {
    const dim3 grid((rows + warps_per_block - 1) / warps_per_block, tokens);
    ternary_gemv_kernel<<<grid, block, 0, stream>>>(x, x_sum, x_scale, w, w_scale, y, rows, row_bytes, tokens);
  } else {
    const int tiles = (rows + kBinaryTile - 1) / kBinaryTile;
    const dim3 grid((tiles + warps_per_block - 1) / warps_per_block, tokens);
    binary_tile_gemv_kernel<<<grid, block, 0, stream>>>(x, x_sum, x_scale, w, w_scale, y, rows, row_bytes, tokens);
  }
  return cudaGetLastError();
}
