// Device helpers shared by the streamed-weight persistent kernels (stream_loop.cu: Huginn's latent loop,
// stream_thought.cu: Coconut's thoughts) on top of the ring (stream_ring.cuh): bf16 rounding as the PyTorch
// reference materialises it, the consumer warps' ids, the consumers' grid-wide step (a monotonic counter the
// producer never joins) and zeroing spread over the grid.
#pragma once
#include "device_utils.cuh"
#include "stream_ring.cuh"

namespace latentrt_ring {

__device__ __forceinline__ float rnd(float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float ldb(const bf16* p) { return __bfloat162float(__ldcg(p)); }
__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }
__device__ __forceinline__ int consumer_warp() { return threadIdx.x / 32 - 1; }
__device__ __forceinline__ int consumer_thread() { return threadIdx.x - 32; }

// Every CTA's consumers have finished the phase (their writes visible) before any goes on; `phase` counts
// this CTA's steps (the counter's target is phase x the grid).
__device__ __forceinline__ void grid_step(unsigned* counter, unsigned& phase, const Watch* watch) {
  arrive(counter);
  ++phase;
  wait_for(counter, phase * gridDim.x, watch, (int)phase);
}

// Zero n floats, spread over every consumer thread of the grid.
__device__ inline void zero(float* p, size_t n) {
  const size_t stride = (size_t)gridDim.x * 32 * kConsumerWarps;
  for (size_t i = (size_t)blockIdx.x * 32 * kConsumerWarps + consumer_thread(); i < n; i += stride) p[i] = 0.f;
}

// Sum / max over the CTA's consumer threads (every one gets it); `sm` holds kConsumerWarps floats.
__device__ inline float consumer_sum(float v, float* sm) {
  v = latentrt_device::warp_sum(v);
  consumers_sync();  // sm may still be read from the previous call
  if (lane_id() == 0) sm[consumer_warp()] = v;
  consumers_sync();
  float t = 0.f;
  for (int w = 0; w < kConsumerWarps; ++w) t += sm[w];
  return t;
}
__device__ inline float consumer_max(float v, float* sm) {
  v = latentrt_device::warp_max(v);
  consumers_sync();
  if (lane_id() == 0) sm[consumer_warp()] = v;
  consumers_sync();
  float t = -INFINITY;
  for (int w = 0; w < kConsumerWarps; ++w) t = fmaxf(t, sm[w]);
  return t;
}

// 8 floats to 8 bf16 (one 16-byte store).
__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

}  // namespace latentrt_ring
