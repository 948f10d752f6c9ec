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

// Two bf16 (a 32-bit word, the first in the low half) to fp32, exactly: a bf16 is an fp32's high 16 bits.
// One shift and one mask (two instructions), where __bfloat1622float2 compiles to three (PRMT, two shifts):
// the streamed kernels' CUDA-core consumers spend most of their instructions unpacking weights.
__device__ __forceinline__ void bf16x2_floats(uint32_t v, float& lo, float& hi) {
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
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

// fp32 -> bf16 -> fp32: where the published criteria, computed on bf16 states, round a value.
__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// A row's sums for the state criteria (latentrt/exits.py), new state s against the state of the previous
// check p: |s - p|^2, |s|^2, s.p, |p|^2; both persistent loops accumulate them and decide by `value`. The
// rounding is the reference's (latentrt/kernels/reference.py: the published formulas on bf16 states):
// s - p and s * p per element, then each norm, the dot, each quotient and 1 - cos; the threshold the
// value is compared with is rounded to bf16 on the host (a bf16 tensor compares with a float in bf16).
struct StateSums {
  float diff = 0.f, nn = 0.f, dot = 0.f, np = 0.f;
  __device__ __forceinline__ void add(float s, float p) {
    const float d = round_bf16(s - p);
    diff += d * d;
    nn += s * s;
    dot += round_bf16(s * p);
    np += p * p;
  }
  // criterion 1 latent-diff: |s - p| / |s|; 2 cosine: 1 - cos(s, p) (a zero state: NaN, never below a
  // threshold, as published); anything else never exits (+inf). IEEE-rounded roots and quotients (fast
  // math would approximate them), as torch's.
  __device__ __forceinline__ float value(int criterion) const {
    const float norm_s = round_bf16(__fsqrt_rn(nn));
    if (criterion == 1) return round_bf16(__fdiv_rn(round_bf16(__fsqrt_rn(diff)), norm_s));
    if (criterion == 2) {
      const float over_s = round_bf16(__fdiv_rn(round_bf16(dot), norm_s));
      return round_bf16(1.f - round_bf16(__fdiv_rn(over_s, round_bf16(__fsqrt_rn(np)))));
    }
    return INFINITY;
  }
};

}  // namespace latentrt_device
