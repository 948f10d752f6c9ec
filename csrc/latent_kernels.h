// Host launchers of the CUDA building blocks; 0 = launched, 1 = unsupported shape, 2 = CUDA error.
#pragma once
#include <stdint.h>

namespace latentrt {
int gemv_bf16(const void* x, const void* w, const void* add, const void* active, void* out, int M, int N, int K,
              int ldw, int sm_count, void* stream);
int decode_attention_bf16(const void* q, const void* k, const void* v, const void* written, const void* valid,
                          void* out, int batch, int n_head, int n_kv, int D, int length, int slot,
                          int use_written, int64_t s_slot, int64_t s_b, int64_t s_h, int64_t s_t, int64_t s_wb,
                          int64_t s_vb, float scale, void* stream);
int device_info(int device, int* sm_count, int* smem_per_block_optin, int* l2_bytes);
}  // namespace latentrt
