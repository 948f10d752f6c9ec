// Device building blocks of the persistent latent-loop kernel (issue #5), usable on their own:
//  - gemv_bf16: out[m, n] = x[m, :] . W[n, :] (+ add[m, n]) for few rows m (decode), W streamed once with
//    16-byte loads, fp32 accumulation, one warp per output column; returns early when no row is active.
//  - decode_attention_bf16: one query per (sequence, head) over the cache, keys/values of position p read
//    from slot min(slot, written[b, p] - 1) (latentrt.cache's lookup rule), invalid positions skipped.
// Host launchers take raw device pointers and a stream, so the extension does not depend on torch's build.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "latent_kernels.h"

namespace {

using latentrt_device::kWarp;
using latentrt_device::warp_sum;

// Rows of x are processed MT at a time so the accumulators stay in registers (compile-time indices).
template <int MT>
__global__ void gemv_bf16_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                 const __nv_bfloat16* __restrict__ add, const uint8_t* __restrict__ active,
                                 __nv_bfloat16* __restrict__ out, int M, int N, int K, int ldw) {
  __shared__ int any_active;
  if (threadIdx.x == 0) {
    int a = 0;
    for (int m = 0; m < M; ++m) a |= active[m];
    any_active = a;
  }
  __syncthreads();
  if (!any_active) return;  // every sequence frozen: do not read W
  const int warps = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int n = blockIdx.x * warps + threadIdx.x / kWarp; n < N; n += gridDim.x * warps) {
    const __nv_bfloat16* wrow = w + (size_t)n * ldw;
    for (int m0 = 0; m0 < M; m0 += MT) {
      float acc[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) acc[i] = 0.f;
      for (int k = lane * 8; k < K; k += kWarp * 8) {  // 16 bytes of W per lane per step
        float wf[8];
        latentrt_device::unpack8(*reinterpret_cast<const uint4*>(wrow + k), wf);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (m0 + i < M) {
            float xf[8];
            latentrt_device::unpack8(*reinterpret_cast<const uint4*>(x + (size_t)(m0 + i) * K + k), xf);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i] += wf[j] * xf[j];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        float v = warp_sum(acc[i]);
        int m = m0 + i;
        if (lane == 0 && m < M && active[m]) {
          float r = __bfloat162float(__float2bfloat16(v));  // round like the reference linear
          if (add != nullptr) r += __bfloat162float(add[(size_t)m * N + n]);
          out[(size_t)m * N + n] = __float2bfloat16(r);
        }
      }
    }
  }
}

// One block per (b, h); each warp walks positions warp, warp+W, ... with an online softmax over its share,
// lanes covering head_dim (<= 128: 4 elements per lane); the warps' partial results merge in shared memory.
__global__ void decode_attention_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                        const __nv_bfloat16* __restrict__ v, const int64_t* __restrict__ written,
                                        const uint8_t* __restrict__ valid, __nv_bfloat16* __restrict__ out,
                                        int n_head, int group, int D, int length, int slot, int use_written,
                                        int64_t s_slot, int64_t s_b, int64_t s_h, int64_t s_t, int64_t s_wb,
                                        int64_t s_vb, float scale) {
  constexpr int kMaxPerLane = 4;
  const int b = blockIdx.x, h = blockIdx.y, hk = h / group;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  float qf[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    int d = lane + i * kWarp;
    qf[i] = d < D ? __bfloat162float(q[((size_t)b * n_head + h) * D + d]) : 0.f;
    acc[i] = 0.f;
  }
  float m_i = -INFINITY, l_i = 0.f;
  for (int t = warp; t < length; t += warps) {
    bool ok = valid[(size_t)b * s_vb + t] || t == length - 1;
    if (!ok) continue;
    int64_t sl = slot;
    if (use_written) {
      int64_t n = written[(size_t)b * s_wb + t] - 1;
      sl = n < 0 ? 0 : (n < slot ? n : slot);
    }
    const size_t base = sl * s_slot + b * s_b + hk * s_h + t * s_t;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      int d = lane + i * kWarp;
      if (d < D) dot += qf[i] * __bfloat162float(k[base + d]);
    }
    float s = warp_sum(dot) * scale;
    float m_new = fmaxf(m_i, s);
    float alpha = __expf(m_i - m_new), p = __expf(s - m_new);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      int d = lane + i * kWarp;
      if (d < D) acc[i] = acc[i] * alpha + p * __bfloat162float(v[base + d]);
    }
    l_i = l_i * alpha + p;
    m_i = m_new;
  }
  __shared__ float sm_m[32], sm_l[32], sm_acc[32][128];
  if (lane == 0) {
    sm_m[warp] = m_i;
    sm_l[warp] = l_i;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    int d = lane + i * kWarp;
    if (d < D) sm_acc[warp][d] = acc[i];
  }
  __syncthreads();
  if (warp == 0) {
    float m = -INFINITY;
    for (int w2 = 0; w2 < warps; ++w2) m = fmaxf(m, sm_m[w2]);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      int d = lane + i * kWarp;
      if (d >= D) continue;
      float num = 0.f, den = 0.f;
      for (int w2 = 0; w2 < warps; ++w2) {
        if (sm_l[w2] == 0.f) continue;
        float f = __expf(sm_m[w2] - m);
        num += sm_acc[w2][d] * f;
        den += sm_l[w2] * f;
      }
      out[((size_t)b * n_head + h) * D + d] = __float2bfloat16(num / den);
    }
  }
}

}  // namespace

namespace latentrt {

int gemv_bf16(const void* x, const void* w, const void* add, const void* active, void* out, int M, int N, int K,
              int ldw, int sm_count, void* stream) {
  if (K % 8 != 0 || ldw % 8 != 0) return 1;  // 16-byte loads need K and the row stride in multiples of 8
  const int threads = 256, warps = threads / kWarp;
  int blocks = (N + warps - 1) / warps;
  if (blocks > 8 * sm_count) blocks = 8 * sm_count;  // grid-stride beyond a few waves
  gemv_bf16_kernel<4><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w),
      static_cast<const __nv_bfloat16*>(add), static_cast<const uint8_t*>(active),
      static_cast<__nv_bfloat16*>(out), M, N, K, ldw);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

int decode_attention_bf16(const void* q, const void* k, const void* v, const void* written, const void* valid,
                          void* out, int batch, int n_head, int n_kv, int D, int length, int slot,
                          int use_written, int64_t s_slot, int64_t s_b, int64_t s_h, int64_t s_t, int64_t s_wb,
                          int64_t s_vb, float scale, void* stream) {
  if (D > 128 || n_head % n_kv != 0) return 1;
  dim3 grid(batch, n_head);
  decode_attention_kernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k),
      static_cast<const __nv_bfloat16*>(v), static_cast<const int64_t*>(written),
      static_cast<const uint8_t*>(valid), static_cast<__nv_bfloat16*>(out), n_head, n_head / n_kv, D, length,
      slot, use_written, s_slot, s_b, s_h, s_t, s_wb, s_vb, scale);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

int device_info(int device, int* sm_count, int* smem_per_block_optin, int* l2_bytes) {
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) return 2;
  *sm_count = p.multiProcessorCount;
  *smem_per_block_optin = static_cast<int>(p.sharedMemPerBlockOptin);
  *l2_bytes = p.l2CacheSize;
  return 0;
}

}  // namespace latentrt
