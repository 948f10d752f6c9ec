// The streamed-weight thought loop (stream_thought.cu): Coconut's k continuous thoughts in one launch on the
// streamed ring, with thought_loop.h's arguments (`scratch` and `layer_table` sized by the functions below,
// `watch` / `watch_cycles` for the watchdog).
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

#include "thought_loop.h"

namespace latentrt {

// Grid and dynamic shared memory of a launch; "" when the kernel can run it, else the reason it cannot.
std::string stream_thought_plan(const ThoughtLoopArgs& a, int device, int* grid, int* smem_bytes);
// Bytes of the workspace (`scratch`) and of the device table (`layer_table`) for a grid of `ctas` CTAs.
long long stream_thought_scratch_bytes(const ThoughtLoopArgs& a, int ctas);
long long stream_thought_table_bytes(const ThoughtLoopArgs& a, int ctas);
// The device table's bytes for the launch arguments (`layer_table` and `scratch` set: the table holds
// addresses in both), to upload once and launch with `table_uploaded` (a launch captured in a CUDA graph);
// empty when there is no plan. `sms` > 0: planned for that many SMs and `smem_optin` bytes of shared memory
// instead of the device's (host-side tests).
std::vector<uint8_t> stream_thought_table(const ThoughtLoopArgs& a, int device, int sms = 0, long long smem_optin = 0);
// 0 launched, 1 unsupported or a missing buffer, 2 CUDA error (its text in `why`, and cleared). Uploads the
// table (unless `table_uploaded`) and resets the counter (`barrier`, 4 bytes) on the launch's stream first.
int stream_thought(const ThoughtLoopArgs& a, int device, std::string* why = nullptr);

}  // namespace latentrt
