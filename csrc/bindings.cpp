// pybind11 bindings: raw device pointers and a stream handle in, a status code out (0 ok, 1 unsupported, 2 CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "device_info.h"
#include "recurrent_loop.h"
#include "stream_loop.h"
#include "stream_plan.h"
#include "stream_thought.h"
#include "thought_loop.h"

namespace py = pybind11;

// latentrt/cuda_sources.py's digest of csrc/ as setup.py found it (latentrt.cuda_ext refuses an extension whose
// digest is not the checkout's: built from other sources)
#ifndef LATENTRT_SOURCE_DIGEST
#define LATENTRT_SOURCE_DIGEST ""
#endif

static void check(int status, const char* what) {
  if (status == 1) throw std::invalid_argument(std::string(what) + ": unsupported shape or alignment");
  if (status != 0) throw std::runtime_error(std::string(what) + ": CUDA launch failed");
}

static void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A launch planner's answer: ok, the reason when not, and the grid / shared memory it would use.
template <class Args, class Plan>
static py::dict plan_dict(Plan plan, const Args& a, int device) {
  int grid = 0, smem = 0;
  std::string why = plan(a, device, &grid, &smem);
  py::dict d;
  d["ok"] = why.empty();
  d["reason"] = why;
  d["grid"] = grid;
  d["smem_bytes"] = smem;
  return d;
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "latentrt CUDA kernels: the persistent latent and thought loops, their planners";
  m.attr("source_digest") = LATENTRT_SOURCE_DIGEST;
  using latentrt::LoopArgs;
  using latentrt::SandwichLayer;
  py::class_<SandwichLayer>(m, "SandwichLayer", "device pointers of one Huginn sandwich layer")
      .def(py::init<>())
      .def_readwrite("norm_1", &SandwichLayer::norm_1)
      .def_readwrite("norm_2", &SandwichLayer::norm_2)
      .def_readwrite("norm_3", &SandwichLayer::norm_3)
      .def_readwrite("norm_4", &SandwichLayer::norm_4)
      .def_readwrite("wqkv", &SandwichLayer::wqkv)
      .def_readwrite("qk_bias", &SandwichLayer::qk_bias)
      .def_readwrite("wo", &SandwichLayer::wo)
      .def_readwrite("wfc", &SandwichLayer::wfc)
      .def_readwrite("wproj", &SandwichLayer::wproj)
      .def_readwrite("k_cache", &SandwichLayer::k_cache)
      .def_readwrite("v_cache", &SandwichLayer::v_cache)
      .def_readwrite("slots", &SandwichLayer::slots);
  py::class_<LoopArgs>(m, "LoopArgs", "arguments of one persistent recurrent-loop launch (see recurrent_loop.h)")
      .def(py::init<>())
#define FIELD(name) .def_readwrite(#name, &LoopArgs::name)
      FIELD(batch) FIELD(d) FIELD(n_head) FIELD(n_kv) FIELD(head_dim) FIELD(ffn) FIELD(max_len) FIELD(vocab)
      FIELD(pos) FIELD(r_max) FIELD(min_steps) FIELD(check_every) FIELD(criterion) FIELD(eps) FIELD(threshold)
      FIELD(core) FIELD(coda) FIELD(adapter) FIELD(ld_adapter) FIELD(term) FIELD(ln_f) FIELD(lm_head) FIELD(cos)
      FIELD(sin) FIELD(valid) FIELD(written) FIELD(state) FIELD(ref_state) FIELD(active) FIELD(used) FIELD(logits)
      FIELD(prev_logp) FIELD(scratch) FIELD(table) FIELD(pos_ptr) FIELD(watch) FIELD(watch_cycles) FIELD(split_attention) FIELD(stage_input) FIELD(tensor_copy) FIELD(tensor_core_gemv) FIELD(barrier) FIELD(barrier_mode) FIELD(stream);
#undef FIELD
  m.def("loop_plan", [](const LoopArgs& a, int device) { return plan_dict(latentrt::loop_plan, a, device); });
  m.def("loop_scratch_elems", &latentrt::loop_scratch_elems);
  m.def("stream_loop_plan", [](const LoopArgs& a, int device) { return plan_dict(latentrt::stream_loop_plan, a, device); });
  m.def("stream_loop_scratch_bytes", &latentrt::stream_loop_scratch_bytes);
  m.def("stream_loop_table", &latentrt::stream_loop_table);
  m.def("stream_loop", [](const LoopArgs& a, int device) {
    std::string why;
    const int status = latentrt::stream_loop(a, device, &why);
    if (status == 2) throw std::runtime_error("stream_loop: CUDA launch failed: " + why);
    check(status, "stream_loop");
  });

  using latentrt::Gpt2LayerArgs;
  using latentrt::ThoughtLoopArgs;
  py::class_<Gpt2LayerArgs>(m, "Gpt2LayerArgs", "device pointers of one GPT-2 layer (Conv1D weights transposed)")
      .def(py::init<>())
#define LFIELD(name) .def_readwrite(#name, &Gpt2LayerArgs::name)
      LFIELD(ln_1_w) LFIELD(ln_1_b) LFIELD(attn_w) LFIELD(attn_b) LFIELD(proj_w) LFIELD(proj_b) LFIELD(ln_2_w)
      LFIELD(ln_2_b) LFIELD(fc_w) LFIELD(fc_b) LFIELD(out_w) LFIELD(out_b) LFIELD(k_cache) LFIELD(v_cache)
      LFIELD(scale);
#undef LFIELD
  py::class_<ThoughtLoopArgs>(m, "ThoughtLoopArgs", "arguments of one Coconut thought-loop launch")
      .def(py::init<>())
#define TFIELD(name) .def_readwrite(#name, &ThoughtLoopArgs::name)
      TFIELD(batch) TFIELD(d) TFIELD(n_head) TFIELD(head_dim) TFIELD(ffn) TFIELD(max_len) TFIELD(n_thoughts)
      TFIELD(pos) TFIELD(eps) TFIELD(layers) TFIELD(ln_f_w) TFIELD(ln_f_b) TFIELD(wpe) TFIELD(positions) TFIELD(h)
      TFIELD(out) TFIELD(valid) TFIELD(active) TFIELD(layer_table) TFIELD(scratch) TFIELD(barrier)
      TFIELD(barrier_mode) TFIELD(watch) TFIELD(watch_cycles) TFIELD(embeds) TFIELD(lm_head) TFIELD(logits)
          TFIELD(vocab) TFIELD(pos_ptr) TFIELD(table_uploaded) TFIELD(stage_input) TFIELD(stream);
#undef TFIELD
  m.def("thought_plan",
        [](const ThoughtLoopArgs& a, int device) { return plan_dict(latentrt::thought_plan, a, device); });
  m.def("thought_scratch_elems", &latentrt::thought_scratch_elems);
  m.def("stream_thought_plan",
        [](const ThoughtLoopArgs& a, int device) { return plan_dict(latentrt::stream_thought_plan, a, device); });
  m.def("stream_thought_scratch_bytes", &latentrt::stream_thought_scratch_bytes, py::arg("args"), py::arg("ctas"));
  m.def("stream_thought_table_bytes", &latentrt::stream_thought_table_bytes, py::arg("args"), py::arg("ctas"));
  m.def(
      "stream_thought_table",
      [](const ThoughtLoopArgs& a, int device, int sms, long long smem_optin) {
        const std::vector<uint8_t> t = latentrt::stream_thought_table(a, device, sms, smem_optin);
        return py::bytes(reinterpret_cast<const char*>(t.data()), t.size());
      },
      py::arg("args"), py::arg("device"), py::arg("sms") = 0, py::arg("smem_optin") = 0,
      "the streamed thought loop's device table (bytes) for these arguments, to upload once; sms > 0 plans for "
      "that many SMs and smem_optin bytes of shared memory without a device");
  m.def("stream_thought", [](const ThoughtLoopArgs& a, int device) {
    std::string why;
    const int status = latentrt::stream_thought(a, device, &why);
    if (status == 2) throw std::runtime_error("stream_thought: CUDA launch failed: " + why);
    check(status, "stream_thought");
  });
  m.def("thought_table_bytes", &latentrt::thought_table_bytes);
  m.def("thought_loop",
        [](const ThoughtLoopArgs& a, int device) { check(latentrt::thought_loop(a, device), "thought_loop"); });
  m.def("latent_loop", [](const LoopArgs& a, int device) { check(latentrt::latent_loop(a, device), "latent_loop"); });
  m.def(
      "stream_plan",
      [](const std::vector<std::pair<int64_t, int64_t>>& mats, int batch, int ctas, int64_t smem_optin, int tile_rows,
         int k_chunk, bool stage_input, int mma_from) {
        const auto p =
            latentrt_stream::plan_stream(mats, batch, ctas, smem_optin, tile_rows, k_chunk, stage_input, mma_from);
        py::dict d;
        d["ok"] = p.reason.empty();
        d["reason"] = p.reason;
        d["batch"] = p.batch;
        d["ctas"] = p.ctas;
        d["tile_rows"] = p.tile_rows;
        d["k_chunk"] = p.k_chunk;
        d["stages"] = p.stages;
        d["tensor_cores"] = p.tensor_cores;
        d["stage_bytes"] = p.stage_bytes;
        d["reduce_bytes"] = p.reduce_bytes;
        d["stage_input"] = p.stage_input;
        d["input_bytes"] = p.input_bytes;
        d["smem_bytes"] = p.smem_bytes;
        py::list ops;
        for (const auto& op : p.ops) {
          py::dict o;
          o["rows"] = op.rows;
          o["cols"] = op.cols;
          o["row_tiles"] = op.row_tiles;
          o["split_k"] = op.split_k;
          o["tiles"] = op.tiles();
          o["balance"] = op.balance;
          o["cta_first"] = op.cta_first;
          py::list bytes;
          for (int64_t t = 0; t < op.tiles(); ++t) bytes.append(latentrt_stream::tile_bytes(op, p.tile_rows, t));
          o["tile_bytes"] = bytes;
          py::list cols;
          for (int s = 0; s < op.split_k; ++s) {
            int64_t c0, c1;
            latentrt_stream::split_cols(op.cols, op.split_k, s, &c0, &c1);
            cols.append(py::make_tuple(c0, c1));
          }
          o["split_cols"] = cols;
          ops.append(o);
        }
        d["ops"] = ops;
        return d;
      },
      "the streamed-weight kernel's plan (csrc/stream_plan.h) for matrices {rows, cols} in execution order",
      py::arg("mats"), py::arg("batch"), py::arg("ctas"), py::arg("smem_optin"), py::arg("tile_rows") = 0,
      py::arg("k_chunk") = 0, py::arg("stage_input") = true, py::arg("mma_from") = latentrt_stream::kMmaFromBatch);
  m.def("attention_splits", &latentrt_stream::attention_splits,
        "splits per (row, head) of the streamed kernel's split attention (csrc/stream_plan.h)", py::arg("heads"),
        py::arg("positions"), py::arg("warps"), py::arg("split_max"));
  m.def("attention_split_max", &latentrt_stream::attention_split_max,
        "the most splits the workspace of `heads` (row, head) pairs holds", py::arg("heads"));
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
