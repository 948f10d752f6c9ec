// Device code shared by the persistent loop kernels (recurrent_loop.cu, thought_loop.cu): block and grid
// reductions, the grid barrier, the skinny GEMV streamed over the whole grid, decode attention with the KV
// slot rule (latentrt/kv_modes.py), and the cooperative-launch planner. Everything here is templated on
// (or independent of) each kernel's argument struct, so each translation unit instantiates what it uses.
// Data written inside a launch is read with ld.global.cg (L2), never through the incoherent L1.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <string>

#include "device_utils.cuh"

namespace latentrt_loop {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;

using latentrt_device::kWarp;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxB = 16;
constexpr int kMaxHeadDim = 128;

using latentrt_device::unpack8;
using latentrt_device::warp_max;
using latentrt_device::warp_sum;

__device__ __forceinline__ float rnd(float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(__ldcg(p)); }

// Sum over the block (all threads get the result). `red` holds kWarps floats.
__device__ inline float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += red[w];
  return t;
}

__device__ inline float block_max(float v, float* red) {
  v = warp_max(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t = fmaxf(t, red[w]);
  return t;
}

// Grid-wide barrier: cooperative groups, or an arrival counter + generation word in global memory.
template <class A>
__device__ void grid_sync(const A& a) {
  if (a.barrier_mode == 0) {
    cg::this_grid().sync();
    return;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* count = a.barrier;
    volatile unsigned* gen = a.barrier + 1;
    const unsigned g = *gen;
    __threadfence();  // this block's writes are visible before it arrives
    if (atomicAdd(count, 1u) == gridDim.x - 1) {
      atomicExch(count, 0u);
      __threadfence();
      atomicAdd(a.barrier + 1, 1u);
    } else {
      while (*gen == g) __nanosleep(20);
    }
    __threadfence();
  }
  __syncthreads();
}

// Skinny GEMV over the grid: each warp owns groups of NC weight rows (rows(grp, c)) and computes their
// dot products with the B input rows (staged xs, or global xg with row stride ldx), streaming W once with
// 16-byte loads; lane 0 hands the fp32 sums to the epilogue. K must be a multiple of 8.
template <int MB, int NC, class A, class Rows, class Epi>
__device__ void gemv(const A& a, const bf16* W, int ldw, int groups, int K, const bf16* xs, const bf16* xg,
                     int ldx, Rows rows, Epi epi) {
  const int lane = threadIdx.x % kWarp;
  const int nw = gridDim.x * kWarps;
  for (int grp = blockIdx.x * kWarps + threadIdx.x / kWarp; grp < groups; grp += nw) {
    const bf16* wr[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) wr[c] = W + (size_t)rows(grp, c) * ldw;
    float acc[NC][MB];
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int b = 0; b < MB; ++b) acc[c][b] = 0.f;
#pragma unroll 2
    for (int k = lane * 8; k < K; k += kWarp * 8) {
      float wf[NC][8];
#pragma unroll
      for (int c = 0; c < NC; ++c) unpack8(__ldg(reinterpret_cast<const uint4*>(wr[c] + k)), wf[c]);
#pragma unroll
      for (int b = 0; b < MB; ++b) {
        if (b < a.B) {
          const uint4 xv = xs != nullptr ? *reinterpret_cast<const uint4*>(xs + (size_t)b * K + k)
                                         : __ldcg(reinterpret_cast<const uint4*>(xg + (size_t)b * ldx + k));
          float xf[8];
          unpack8(xv, xf);
#pragma unroll
          for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[c][b] += wf[c][j] * xf[j];
        }
      }
    }
#pragma unroll
    for (int b = 0; b < MB; ++b)
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (b < a.B) acc[c][b] = warp_sum(acc[c][b]);
    if (lane == 0) epi(grp, acc);
  }
}

struct Row1 {
  __device__ int operator()(int g, int) const { return g; }
};
struct RowPair {  // adjacent rows (a RoPE pair)
  __device__ int operator()(int g, int c) const { return 2 * g + c; }
};
struct RowGate {  // gate row g and up row g + I
  int I;
  __device__ int operator()(int g, int c) const { return g + c * I; }
};

// One query per (sequence, head) over positions [0, pos]: online softmax per warp, merged in shared memory.
// K/V [slots, B, Hkv, T, D]; with use_written the key of position p comes from slot min(slot, n_p - 1).
template <class A>
__device__ void attention(const A& a, const bf16* K, const bf16* V, int pos, int slot, bool use_written,
                          const uint8_t* act, float scale, float* smem) {
  float* sm_m = smem;
  float* sm_l = smem + kWarps;
  float* sm_acc = smem + 2 * kWarps;  // [kWarps][kMaxHeadDim]
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int D = a.D, group = a.H / a.Hkv, length = pos + 1;
  for (int item = blockIdx.x; item < a.B * a.H; item += gridDim.x) {
    const int b = item / a.H, h = item % a.H, hk = h / group;
    if (!act[b]) continue;  // uniform across the block
    float qf[kMaxHeadDim / kWarp], acc[kMaxHeadDim / kWarp];
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
      const int dd = lane + i * kWarp;
      qf[i] = dd < D ? ld(a.q + ((size_t)b * a.H + h) * D + dd) : 0.f;
      acc[i] = 0.f;
    }
    float m_i = -INFINITY, l_i = 0.f;
    for (int t = warp; t < length; t += kWarps) {
      if (!(a.valid[(size_t)b * a.T + t] || t == pos)) continue;
      int sl = slot;
      if (use_written && t != pos) {
        const long long n = __ldcg(reinterpret_cast<const long long*>(a.written) + (size_t)b * a.T + t) - 1;
        sl = n < 0 ? 0 : (n < slot ? (int)n : slot);
      }
      const size_t base = ((((size_t)sl * a.B + b) * a.Hkv + hk) * a.T + t) * D;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
        const int dd = lane + i * kWarp;
        if (dd < D) dot += qf[i] * ld(K + base + dd);
      }
      const float s = warp_sum(dot) * scale;
      const float m_new = fmaxf(m_i, s);
      const float alpha = __expf(m_i - m_new), p = __expf(s - m_new);
#pragma unroll
      for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
        const int dd = lane + i * kWarp;
        if (dd < D) acc[i] = acc[i] * alpha + p * ld(V + base + dd);
      }
      l_i = l_i * alpha + p;
      m_i = m_new;
    }
    __syncthreads();  // the previous item's merge is done with the shared arrays
    if (lane == 0) {
      sm_m[warp] = m_i;
      sm_l[warp] = l_i;
    }
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
      const int dd = lane + i * kWarp;
      if (dd < D) sm_acc[warp * kMaxHeadDim + dd] = acc[i];
    }
    __syncthreads();
    for (int dd = threadIdx.x; dd < D; dd += blockDim.x) {
      float m = -INFINITY;
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sm_m[w]);
      float num = 0.f, den = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        if (sm_l[w] == 0.f) continue;
        const float f = __expf(sm_m[w] - m);
        num += sm_acc[w * kMaxHeadDim + dd] * f;
        den += sm_l[w] * f;
      }
      a.y[((size_t)b * a.H + h) * D + dd] = __float2bfloat16(num / den);
    }
  }
}

// Grid and shared memory for a cooperative launch of `kernel`, whose every block stages the batch's rows of
// width d in bf16 (smem = batch x d x 2 bytes); "" when it fits.
inline std::string cooperative_plan(const void* kernel, int batch, int d, int device, int* grid, int* smem_bytes) {
  const int smem = batch * d * 2;
  int sms = 0, optin = 0, coop = 0;  // single attributes: cheap, unlike cudaGetDeviceProperties
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess)
    return "cannot read device attributes";
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return "cannot read the kernel's attributes";
  if (smem + (int)attr.sharedSizeBytes > optin)
    return "staged rows (" + std::to_string(smem) + " B) exceed the shared memory per block (" +
           std::to_string(optin) + " B)";
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return "cannot opt in to " + std::to_string(smem) + " B of shared memory";
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess || per_sm < 1)
    return "the kernel does not fit on an SM (registers or shared memory)";
  if (!coop) return "the device does not support cooperative launches";
  *grid = sms;  // one block per SM: every block resident, all SMs streaming weights
  *smem_bytes = smem;
  return "";
}

}  // namespace latentrt_loop
