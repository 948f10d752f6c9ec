// Tensor maps of weight matrices for the ring's tensor-map stages (stream_ring.cuh: kCopyTensor). The encoder
// is the driver's cuTensorMapEncodeTiled, looked up at run time through the runtime's entry-point query, so
// nothing links against libcuda. Used by the probe (benchmarks/probes/stream_probe.cu); the kernels' move to
// tensor-map copies (issue #11, after the 2026-12-04 probe) takes the same maps.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "stream_ring.cuh"

namespace latentrt_ring {

// The driver's cuTensorMapEncodeTiled (null where the driver has none), looked up once.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    cudaDriverEntryPointQueryResult found;
    void* fn = nullptr;
    const bool ok = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                     &found) == cudaSuccess &&
                    found == cudaDriverEntryPointSuccess;
    cudaGetLastError();  // a failed query leaves no sticky error for the caller's next check
    return ok ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn) : nullptr;
  }();
  return encode;
}

// The map of a bf16 matrix [rows, cols] (row stride `ldw` elements, 16-byte aligned) in the boxes the ring
// `g` copies: Ring::box_k columns x tile_rows rows, with the 128-byte swizzle where Ring::swizzled; reads past
// the matrix's edge land as zeros. "" or why not.
inline std::string encode_weight_map(CUtensorMap* map, const void* w, int64_t rows, int64_t cols, int64_t ldw,
                                     const Ring& g) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return "the driver has no cuTensorMapEncodeTiled";
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)ldw * 2};
  const cuuint32_t box[2] = {(cuuint32_t)g.box_k(), (cuuint32_t)g.tile_rows};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(w), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE,
                            g.swizzled() ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? "" : "cuTensorMapEncodeTiled failed (CUresult " + std::to_string((int)r) + ")";
}

// The rows of the ring's tensor-map stages: the box and its 1024-byte alignment (smem_layout) need at most
// this much dynamic shared memory beyond the plan's (which counts padded rows).
constexpr int kTensorRingSlack = 1024;

// Device copies of tensor-map arrays (a kernel's producer reads its maps from global memory), one per
// distinct key (the weights and the box): encoded and copied on the first launch that needs them and kept
// for the process, so a CUDA graph captured later replays with them in place. A miss under graph capture is
// refused (the copy would be recorded, not done): the runners' first call runs eagerly, outside capture.
class DeviceMaps {
 public:
  // The device array under `key`; on a miss, `n` maps made by `encode(maps)` ("" or why not) and copied.
  template <class Encode>
  const CUtensorMap* get(const std::vector<int64_t>& key, int n, Encode encode, cudaStream_t stream,
                         std::string* why) {
    std::lock_guard<std::mutex> guard(lock_);
    auto found = copies_.find(key);
    if (found != copies_.end()) return found->second;
    std::vector<CUtensorMap> maps(n);
    *why = encode(maps.data());
    if (!why->empty()) return nullptr;
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess || capturing != cudaStreamCaptureStatusNone) {
      cudaGetLastError();
      *why = "tensor maps are copied to the device outside CUDA graph capture (run one launch eagerly first)";
      return nullptr;
    }
    CUtensorMap* dev = nullptr;
    const size_t bytes = (size_t)n * sizeof(CUtensorMap);
    cudaError_t e = cudaMalloc(&dev, bytes);  // 256-byte aligned (a map needs 64)
    if (e == cudaSuccess) e = cudaMemcpy(dev, maps.data(), bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
      *why = cudaGetErrorString(e);
      cudaGetLastError();
      if (dev != nullptr) cudaFree(dev);
      return nullptr;
    }
    copies_.emplace(key, dev);
    return dev;
  }

 private:
  std::mutex lock_;
  std::map<std::vector<int64_t>, const CUtensorMap*> copies_;
};

// Point every op's `w` at its tensor map (the maps of their weights in `g`'s boxes, on the device through
// `cache`); "" or why not (the ops then keep their weights).
template <int N>
inline std::string use_tensor_maps(Op (&ops)[N], int n_ops, const Ring& g, DeviceMaps& cache, cudaStream_t stream) {
  if (g.k_chunk % g.box_k()) return "k_chunk " + std::to_string(g.k_chunk) + " is not a multiple of the box's columns";
  std::vector<int64_t> key = {g.box_k(), g.tile_rows, g.swizzled()};
  for (int o = 0; o < n_ops; ++o)
    key.insert(key.end(), {(int64_t)(uintptr_t)ops[o].w, ops[o].rows, ops[o].cols, ops[o].ldw});
  auto encode = [&](CUtensorMap* maps) -> std::string {  // only on a miss: the eager launches reuse the copy
    for (int o = 0; o < n_ops; ++o) {
      const Op& op = ops[o];
      const std::string why = encode_weight_map(&maps[o], op.w, op.rows, op.cols, op.ldw, g);
      if (!why.empty()) return "matrix " + std::to_string(o) + ": " + why;
    }
    return "";
  };
  std::string why;
  const CUtensorMap* dev = cache.get(key, n_ops, encode, stream, &why);
  if (dev == nullptr) return why;
  for (int o = 0; o < n_ops; ++o) ops[o].w = reinterpret_cast<const bf16*>(dev + o);
  return "";
}

}  // namespace latentrt_ring
