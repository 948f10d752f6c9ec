// What the launch planners read from the device at run time; 0 = ok, 2 = CUDA error.
#pragma once

namespace latentrt {
int device_info(int device, int* sm_count, int* smem_per_block_optin, int* l2_bytes);
}  // namespace latentrt
