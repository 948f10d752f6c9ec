// The streamed-weight persistent loop (stream_loop.cu): the same launch arguments as the barrier kernel
// (recurrent_loop.h's LoopArgs, with `table` and a byte-sized `scratch`), its planner and launcher.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

#include "recurrent_loop.h"

namespace latentrt {

// Grid and dynamic shared memory of a launch; "" when the kernel can run it, else the reason it cannot (the
// caller falls back and logs it). The plan (csrc/stream_plan.h) is cached per shape and device.
std::string stream_loop_plan(const LoopArgs& a, int device, int* grid, int* smem_bytes);
// Bytes of the workspace `scratch` must point to.
long long stream_loop_scratch_bytes(const LoopArgs& a);
// Each matrix's tile runs per CTA (int32, [matrices][ctas + 1]): uploaded once to the device, `table`
// points to it. Empty when there is no plan.
std::vector<int32_t> stream_loop_table(const LoopArgs& a, int device);
// 0 launched, 1 unsupported (see stream_loop_plan) or a missing buffer, 2 CUDA error (its text in `why`, and
// cleared). Resets the counter (`barrier`, 4 bytes) on the launch's stream first.
int stream_loop(const LoopArgs& a, int device, std::string* why = nullptr);

}  // namespace latentrt
