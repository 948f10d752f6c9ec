// The device's SM count, opt-in shared memory per block and L2 size (the planners size grids and rings by them).
#include <cuda_runtime.h>

#include "device_info.h"

namespace latentrt {

int device_info(int device, int* sm_count, int* smem_per_block_optin, int* l2_bytes) {
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) return 2;
  *sm_count = p.multiProcessorCount;
  *smem_per_block_optin = static_cast<int>(p.sharedMemPerBlockOptin);
  *l2_bytes = p.l2CacheSize;
  return 0;
}

}  // namespace latentrt
