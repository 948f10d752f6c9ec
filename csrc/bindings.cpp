// pybind11 bindings: raw device pointers and a stream handle in, a status code out (see latent_kernels.h).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "latent_kernels.h"

namespace py = pybind11;

static void check(int status, const char* what) {
  if (status == 1) throw std::invalid_argument(std::string(what) + ": unsupported shape or alignment");
  if (status != 0) throw std::runtime_error(std::string(what) + ": CUDA launch failed");
}

static void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "latentrt CUDA building blocks (bf16 decode GEMV, slot-rule decode attention)";
  m.def("gemv_bf16", [](uintptr_t x, uintptr_t w, uintptr_t add, uintptr_t active, uintptr_t out, int M, int N,
                        int K, int ldw, int sm_count, uintptr_t stream) {
    check(latentrt::gemv_bf16(ptr(x), ptr(w), ptr(add), ptr(active), ptr(out), M, N, K, ldw, sm_count, ptr(stream)),
          "gemv_bf16");
  });
  m.def("decode_attention_bf16",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t written, uintptr_t valid, uintptr_t out, int batch,
           int n_head, int n_kv, int D, int length, int slot, int use_written, int64_t s_slot, int64_t s_b,
           int64_t s_h, int64_t s_t, int64_t s_wb, int64_t s_vb, float scale, uintptr_t stream) {
          check(latentrt::decode_attention_bf16(ptr(q), ptr(k), ptr(v), ptr(written), ptr(valid), ptr(out), batch,
                                                n_head, n_kv, D, length, slot, use_written, s_slot, s_b, s_h, s_t,
                                                s_wb, s_vb, scale, ptr(stream)),
                "decode_attention_bf16");
        });
  m.def("device_info", [](int device) {
    int sms = 0, smem = 0, l2 = 0;
    check(latentrt::device_info(device, &sms, &smem, &l2), "device_info");
    py::dict d;
    d["sm_count"] = sms;
    d["smem_per_block_optin"] = smem;
    d["l2_bytes"] = l2;
    return d;
  });
}
