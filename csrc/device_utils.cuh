// Small device helpers shared by the CUDA kernels: warp reductions and bf16 unpacking.
#pragma once
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

namespace latentrt_device {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// 8 bf16 values (one 16-byte load) to fp32.
__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// A row's sums for the state criteria (latentrt/exits.py), new state s against the state of the previous
// check p: |s - p|^2, |s|^2, s.p, |p|^2; both persistent loops accumulate them and decide by `value`.
struct StateSums {
  float diff = 0.f, nn = 0.f, dot = 0.f, np = 0.f;
  __device__ __forceinline__ void add(float s, float p) {
    diff += (s - p) * (s - p);
    nn += s * s;
    dot += s * p;
    np += p * p;
  }
  // criterion 1 latent-diff: |s - p| / |s|; 2 cosine: 1 - cos(s, p); anything else never exits (+inf)
  __device__ __forceinline__ float value(int criterion) const {
    if (criterion == 1) return sqrtf(diff) / sqrtf(nn);
    if (criterion == 2) return 1.f - dot / fmaxf(sqrtf(nn) * sqrtf(np), 1e-8f);
    return INFINITY;
  }
};

}  // namespace latentrt_device
