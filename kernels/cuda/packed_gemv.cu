// CUDA packed GEMV for decode: int8 activation codes x 2-bit ternary / 1-bit binary weights, dp4a.
//
// Same weight layout as the CPU kernels (qat/pack/kernel_layout.py): per row, 64-byte blocks; element
// 64 * plane + j of a block sits in byte j, bits [plane * BITS, (plane + 1) * BITS). A thread reads 4 bytes
// (one uint32) of a block; `(w >> plane * BITS) & mask` gives 4 unsigned codes in the byte lanes that line up
// with 4 contiguous activations, so one __dp4a does 4 products (bitnet.cpp's W2A8 GEMV idea, without its
// interleave since our layout is already plane-major). Codes are stored as q = code + 1 (ternary) or
// b = (code + 1) / 2 (binary): dot = sum(q x) - sum(x), or 2 sum(b x) - sum(x).
// One warp per output row; x codes (padded to whole blocks with zeros), their per-token sums and scales come
// from the host (the activation quantizer of qat/quant/activation.py). Per-tensor/row scale (groups == 1).

#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kBlockBytes = 64;
constexpr int kWarp = 32;

template <int BITS>
__global__ void packed_gemv_kernel(const int8_t* __restrict__ x, const int32_t* __restrict__ x_sum,
                                   const float* __restrict__ x_scale, const uint8_t* __restrict__ w,
                                   const float* __restrict__ w_scale, float* __restrict__ y, int rows,
                                   int row_bytes, int tokens) {
  constexpr int planes = 8 / BITS;
  constexpr uint32_t mask = BITS == 2 ? 0x03030303u : 0x01010101u;
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
      const int q = static_cast<int>((word >> (plane * BITS)) & mask);
      const int xv = *reinterpret_cast<const int*>(xt + (block * planes + plane) * kBlockBytes + byte);
      acc = __dp4a(q, xv, acc);
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    const int dot = BITS == 2 ? acc - x_sum[token] : 2 * acc - x_sum[token];
    y[static_cast<int64_t>(token) * rows + row] = static_cast<float>(dot) * w_scale[row] / x_scale[token];
  }
}

}  // namespace

// Host launcher (device pointers). Returns the launch status.
extern "C" cudaError_t qat_packed_gemv(const int8_t* x, const int32_t* x_sum, const float* x_scale,
                                       const uint8_t* w, const float* w_scale, float* y, int rows, int row_bytes,
                                       int tokens, int bits, cudaStream_t stream) {
  constexpr int warps_per_block = 8;
  const dim3 grid((rows + warps_per_block - 1) / warps_per_block, tokens);
  const dim3 block(warps_per_block * kWarp);
  if (bits == 2)
    packed_gemv_kernel<2><<<grid, block, 0, stream>>>(x, x_sum, x_scale, w, w_scale, y, rows, row_bytes, tokens);
  else
    packed_gemv_kernel<1><<<grid, block, 0, stream>>>(x, x_sum, x_scale, w, w_scale, y, rows, row_bytes, tokens);
  return cudaGetLastError();
}
