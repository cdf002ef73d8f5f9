// Python bindings of the kernels (autoglm/kernels/cpu/ops.py wraps this extension as CpuKernels).
#include <torch/extension.h>

#include "kernels.h"

using namespace autoglm;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_vnni", &has_vnni);
  m.def("has_packed", &has_packed, "whether gemv_packed runs (AVX512-VNNI or AVX2 build)");
  m.def("isa", &isa, "the ISA variant this extension was built for");
  m.def("gemv", &gemv, "y = x @ W.T on raw GGUF blocks", py::call_guard<py::gil_scoped_release>());
  m.def("gemv_q8k", &gemv_q8k, "y = x @ W.T on raw Q4_K/Q5_K/Q6_K, q8_K activations",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "raw GGUF blocks -> float32/bfloat16", py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_out", &dequantize_out, "raw GGUF blocks -> out", py::call_guard<py::gil_scoped_release>());
  m.def("quantize_activations", &quantize_activations, "x -> d * q (q8k: per 256, else per 32)", py::arg("x"),
        py::arg("q8k") = false);
  m.def("pack", &pack, "Q4_0/Q5_0/Q8_0/Q4_K/Q6_K rows -> 16-row interleaved layout", py::call_guard<py::gil_scoped_release>());
  m.def("pack_out", &pack_out, "pack rows into out (a slice of the whole packed weight)",
        py::call_guard<py::gil_scoped_release>());
  m.def("packed_buffer", &packed_buffer, "uninitialized uint8 [rows, cols] for a packed weight (2 MiB pages)");
  m.def("unpack_rows", &unpack_rows, "packed rows -> file order", py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_packed_out", &dequantize_packed_out, "packed rows -> out (float32/bfloat16)",
        py::call_guard<py::gil_scoped_release>());
  m.def("gemv_packed", &gemv_packed, "y = x @ W.T on packed blocks", py::call_guard<py::gil_scoped_release>());
  m.def("gemv_packed_many", &gemv_packed_many, "gemv_packed of several weights on one x, in one parallel region",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "rms_norm(x) * (offset + w)");
  m.def("silu_mul_", &silu_mul_, "g = silu(g) * u in place (the gated MLP activation)");
  m.def("add_rms_norm", &add_rms_norm, "h + rms_norm(y) * (offset + w1), then its rms_norm * (offset + w2)");
  m.def("norm_rope", &norm_rope, "optional per-head rms_norm, then rotary (x * cos + x[perm] * sin)");
  m.def("attend_decode", &attend_decode, "one query per head over n visible cached keys",
        py::call_guard<py::gil_scoped_release>());
  m.def("attend_decode_paged", &attend_decode_paged, "one query per sequence and head over its paged cache span",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_layers", &decode_layers, "a stack of LLaMA-family decoder layers for a decode step",
        py::call_guard<py::gil_scoped_release>());
}
