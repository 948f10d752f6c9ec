// Host-side launch helpers shared by the streamed kernels' launchers (stream_loop.cu, stream_thought.cu):
// the device's room for a plan, workspace carving, and the cooperative launch with its error reporting.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <map>
#include <mutex>
#include <string>

#include "stream_plan.h"

namespace latentrt_stream {

// Workspace pieces in order, each at a 256-byte boundary; `at` ends as the total.
struct Carver {
  size_t at = 0;
  size_t take(size_t bytes) {
    const size_t here = at;
    at = (at + bytes + 255) / 256 * 256;
    return here;
  }
};

// The device's SM count and the dynamic shared memory a CTA of `kernel` may opt in to (beyond its static
// shared memory); "" or why the streamed kernels cannot run there (they need cooperative launches).
inline std::string device_room(int device, const void* kernel, int* sms, int64_t* smem) {
  int optin = 0, coop = 0;
  if (cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess)
    return "cannot read device attributes";
  if (!coop) return "the device does not support cooperative launches";
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return "cannot read the kernel's attributes";
  *smem = optin - (int64_t)attr.sharedSizeBytes;
  return "";
}

// Plans by shape and device: computing one walks every tile of every matrix, too slow for every launch.
template <class Key>
class PlanCache {
 public:
  // The plan of `kernel` over the matrices `mats()` (computed on a miss only) at `batch` rows on `device`,
  // with or without the staged input, `reserve` bytes of the dynamic shared memory kept out of it, tensor cores
  // from batch `mma_from`, cached under `key` (which names the device, the input mode, the reserve and
  // mma_from), or why there is none.
  template <class Mats>
  std::string get(int device, const void* kernel, const Key& key, int batch, bool stage_input, Mats mats, Plan* out,
                  int64_t reserve = 0, int mma_from = kMmaFromBatch) {
    int sms = 0;
    int64_t smem = 0;
    std::string why = device_room(device, kernel, &sms, &smem);
    if (!why.empty()) return why;
    smem -= reserve;
    std::lock_guard<std::mutex> guard(lock_);
    auto found = plans_.find(key);
    if (found == plans_.end()) found = plans_.emplace(key, plan_stream(mats(), batch, sms, smem, 0, 0, stage_input, mma_from)).first;
    if (!found->second.reason.empty()) return found->second.reason;
    *out = found->second;
    return "";
  }

 private:
  std::mutex lock_;
  std::map<Key, Plan> plans_;
};

// The public planners' answer: "" with the plan's grid and dynamic shared memory, or `why`.
inline std::string grid_of(const std::string& why, const Plan& p, int* grid, int* smem_bytes) {
  if (!why.empty()) return why;
  *grid = p.ctas;
  *smem_bytes = (int)p.smem_bytes;
  return "";
}

// A failed CUDA call: its text in `why`, and the error cleared (a failed launch under graph capture must not
// surface later in an unrelated check). Returns 2, the launchers' "CUDA error".
inline int cuda_failed(cudaError_t e, std::string* why) {
  if (why != nullptr) *why = cudaGetErrorString(e);
  cudaGetLastError();
  return 2;
}

// One cooperative launch of `kernel` (one argument struct) over `ctas` CTAs, after zeroing the consumers'
// counter on the stream; the dynamic shared memory limit raised once per kernel and size, not per launch
// (a launch may be under CUDA graph capture). 0, or 2 with the error in `why`.
inline int launch_cooperative(const void* kernel, int ctas, int threads, int smem, void* args, unsigned* counter,
                              cudaStream_t stream, std::string* why) {
  {
    static std::mutex lock;
    static std::map<const void*, int> opted;
    std::lock_guard<std::mutex> guard(lock);
    int& have = opted[kernel];
    if (have < smem) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return cuda_failed(e, why);
      have = smem;
    }
  }
  cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return cuda_failed(err, why);
  void* params[] = {args};
  err = cudaLaunchCooperativeKernel(kernel, dim3(ctas), dim3(threads), params, smem, stream);
  return err == cudaSuccess ? 0 : cuda_failed(err, why);
}

}  // namespace latentrt_stream
