// Tensor maps of weight matrices for the ring's tensor-map stages (stream_ring.cuh: kCopyTensor). The encoder
// is the driver's cuTensorMapEncodeTiled, looked up at run time through the runtime's entry-point query, so
// nothing links against libcuda. Used by the probe (benchmarks/probes/stream_probe.cu); the kernels' move to
// tensor-map copies (issue #11, after the 2026-12-04 probe) takes the same maps.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <string>

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

}  // namespace latentrt_ring
