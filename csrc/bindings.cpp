// The only pybind11 file: converts Python ints/lists into an AdamLaunch, releases the GIL, calls ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "ops.h"

namespace py = pybind11;
using namespace fusedopt;

namespace {

void adam_step_py(int device, std::vector<uintptr_t> params, std::vector<uintptr_t> grads,
                  std::vector<uintptr_t> exp_avgs, std::vector<uintptr_t> exp_avg_sqs,
                  std::vector<uintptr_t> max_exp_avg_sqs, std::vector<uintptr_t> masters,
                  std::vector<uintptr_t> steps, std::vector<int64_t> numels, int param_dtype, int grad_dtype,
                  int state_dtype, double lr, double beta1, double beta2, double eps, double weight_decay,
                  bool decoupled, bool amsgrad, bool maximize, uintptr_t lr_ptr, uintptr_t grad_scale_ptr,
                  uintptr_t found_inf_ptr, uintptr_t stream, int num_threads) {
  AdamLaunch L;
  L.lists.ptrs[kParam] = std::move(params);
  L.lists.ptrs[kGrad] = std::move(grads);
  L.lists.ptrs[kExpAvg] = std::move(exp_avgs);
  L.lists.ptrs[kExpAvgSq] = std::move(exp_avg_sqs);
  L.lists.ptrs[kMaxExpAvgSq] = std::move(max_exp_avg_sqs);
  L.lists.ptrs[kMaster] = std::move(masters);
  L.lists.steps = std::move(steps);
  L.lists.numels = std::move(numels);
  L.dtypes = {DType(param_dtype), DType(grad_dtype), DType(state_dtype)};
  L.config = {beta1, beta2, eps, weight_decay, decoupled, maximize};
  L.lr = lr;
  L.amsgrad = amsgrad;
  L.device_ptrs = {lr_ptr, grad_scale_ptr, found_inf_ptr};
  L.stream = stream;
  L.num_threads = num_threads;
  if (device != int(Device::kCPU) && device != int(Device::kCUDA)) {
    throw std::invalid_argument("fusedopt.adam_step: device code must be 0 (cpu) or 1 (cuda)");
  }
  py::gil_scoped_release release;
  adam_step(Device(device), L);
}

void lion_step_py(int device, std::vector<uintptr_t> params, std::vector<uintptr_t> grads,
                  std::vector<uintptr_t> exp_avgs, std::vector<uintptr_t> masters, std::vector<int64_t> numels,
                  int param_dtype, int grad_dtype, int state_dtype, double lr, double beta1, double beta2,
                  double weight_decay, bool maximize, uintptr_t lr_ptr, uintptr_t grad_scale_ptr,
                  uintptr_t found_inf_ptr, uintptr_t stream, int num_threads) {
  LionLaunch L;
  L.lists.ptrs[kParam] = std::move(params);
  L.lists.ptrs[kGrad] = std::move(grads);
  L.lists.ptrs[kExpAvg] = std::move(exp_avgs);
  L.lists.ptrs[kMaster] = std::move(masters);
  L.lists.numels = std::move(numels);
  L.dtypes = {DType(param_dtype), DType(grad_dtype), DType(state_dtype)};
  L.config = {beta1, beta2, weight_decay, maximize};
  L.lr = lr;
  L.device_ptrs = {lr_ptr, grad_scale_ptr, found_inf_ptr};
  L.stream = stream;
  L.num_threads = num_threads;
  if (device != int(Device::kCPU) && device != int(Device::kCUDA)) {
    throw std::invalid_argument("fusedopt.lion_step: device code must be 0 (cpu) or 1 (cuda)");
  }
  py::gil_scoped_release release;
  lion_step(Device(device), L);
}

void adam8bit_step_py(int device, std::vector<uintptr_t> params, std::vector<uintptr_t> grads,
                      std::vector<uintptr_t> exp_avgs, std::vector<uintptr_t> exp_avg_absmaxs,
                      std::vector<uintptr_t> exp_avg_sqs, std::vector<uintptr_t> exp_avg_sq_absmaxs,
                      std::vector<uintptr_t> masters, std::vector<uintptr_t> steps, std::vector<int64_t> numels,
                      int param_dtype, int grad_dtype, uintptr_t signed_map, uintptr_t unsigned_map, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
                      uintptr_t lr_ptr, uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t stream,
                      int num_threads) {
  Adam8bitLaunch L;
  L.lists.ptrs[kParam] = std::move(params);
  L.lists.ptrs[kGrad] = std::move(grads);
  L.lists.ptrs[kExpAvg] = std::move(exp_avgs);
  L.lists.ptrs[kExpAvgAbsmax] = std::move(exp_avg_absmaxs);
  L.lists.ptrs[kExpAvgSq] = std::move(exp_avg_sqs);
  L.lists.ptrs[kExpAvgSqAbsmax] = std::move(exp_avg_sq_absmaxs);
  L.lists.ptrs[kMaster] = std::move(masters);
  L.lists.steps = std::move(steps);
  L.lists.numels = std::move(numels);
  L.dtypes = {DType(param_dtype), DType(grad_dtype), DType::kFloat32};
  L.config = {beta1, beta2, eps, weight_decay, decoupled, maximize};
  L.lr = lr;
  L.signed_map = signed_map;
  L.unsigned_map = unsigned_map;
  L.device_ptrs = {lr_ptr, grad_scale_ptr, found_inf_ptr};
  L.stream = stream;
  L.num_threads = num_threads;
  if (device != int(Device::kCPU) && device != int(Device::kCUDA)) {
    throw std::invalid_argument("fusedopt.adam8bit_step: device code must be 0 (cpu) or 1 (cuda)");
  }
  py::gil_scoped_release release;
  adam8bit_step(Device(device), L);
}

void lion8bit_step_py(int device, std::vector<uintptr_t> params, std::vector<uintptr_t> grads,
                      std::vector<uintptr_t> exp_avgs, std::vector<uintptr_t> exp_avg_absmaxs,
                      std::vector<uintptr_t> masters, std::vector<int64_t> numels, int param_dtype, int grad_dtype,
                      uintptr_t signed_map, double lr, double beta1, double beta2, double weight_decay,
                      bool maximize, uintptr_t lr_ptr, uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr,
                      uintptr_t stream, int num_threads) {
  Lion8bitLaunch L;
  L.lists.ptrs[kParam] = std::move(params);
  L.lists.ptrs[kGrad] = std::move(grads);
  L.lists.ptrs[kExpAvg] = std::move(exp_avgs);
  L.lists.ptrs[kExpAvgAbsmax] = std::move(exp_avg_absmaxs);
  L.lists.ptrs[kMaster] = std::move(masters);
  L.lists.numels = std::move(numels);
  L.dtypes = {DType(param_dtype), DType(grad_dtype), DType::kFloat32};
  L.config = {beta1, beta2, weight_decay, maximize};
  L.lr = lr;
  L.signed_map = signed_map;
  L.device_ptrs = {lr_ptr, grad_scale_ptr, found_inf_ptr};
  L.stream = stream;
  L.num_threads = num_threads;
  if (device != int(Device::kCPU) && device != int(Device::kCUDA)) {
    throw std::invalid_argument("fusedopt.lion8bit_step: device code must be 0 (cpu) or 1 (cuda)");
  }
  py::gil_scoped_release release;
  lion8bit_step(Device(device), L);
}

void check_device(int device, const char* who) {
  if (device != int(Device::kCPU) && device != int(Device::kCUDA)) {
    throw std::invalid_argument(std::string(who) + ": device code must be 0 (cpu) or 1 (cuda)");
  }
}

void muon_prepare_py(int device, std::vector<uintptr_t> grads, std::vector<uintptr_t> buffers,
                     std::vector<uintptr_t> outs, std::vector<int64_t> numels, int buffer_dtype, int grad_dtype,
                     double momentum, bool nesterov, double eps, double safety, uintptr_t partials,
                     uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t stream, int num_threads) {
  check_device(device, "fusedopt.muon_prepare");
  MuonPrepareLaunch L;
  L.lists.ptrs[kGrad] = std::move(grads);
  L.lists.ptrs[kMuonBuffer] = std::move(buffers);
  L.lists.ptrs[kMuonOut] = std::move(outs);
  L.lists.numels = std::move(numels);
  L.dtypes = {DType(buffer_dtype), DType(grad_dtype), DType(buffer_dtype)};
  L.momentum = momentum;
  L.nesterov = nesterov;
  L.eps = eps;
  L.safety = safety;
  L.partials = partials;
  L.device_ptrs = {0, grad_scale_ptr, found_inf_ptr};
  L.stream = stream;
  L.num_threads = num_threads;
  py::gil_scoped_release release;
  muon_prepare(Device(device), L);
}

void muon_apply_py(int device, std::vector<uintptr_t> params, std::vector<uintptr_t> outs,
                   std::vector<int64_t> numels, int param_dtype, double lr, double weight_decay, double lr_factor,
                   uintptr_t lr_ptr, uintptr_t found_inf_ptr, uintptr_t stream, int num_threads) {
  check_device(device, "fusedopt.muon_apply");
  MuonApplyLaunch L;
  L.lists.ptrs[kParam] = std::move(params);
  L.lists.ptrs[kMuonOut] = std::move(outs);
  L.lists.numels = std::move(numels);
  L.dtypes = {DType(param_dtype), DType(param_dtype), DType(param_dtype)};
  L.lr = lr;
  L.weight_decay = weight_decay;
  L.lr_factor = lr_factor;
  L.device_ptrs = {lr_ptr, 0, found_inf_ptr};
  L.stream = stream;
  L.num_threads = num_threads;
  py::gil_scoped_release release;
  muon_apply(Device(device), L);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedopt native backends (CPU always, CUDA when built). Takes raw pointers; see fusedopt/_ops.py.";
  m.def("adam_step", &adam_step_py, "One fused Adam/AdamW step over a list of tensors",
        py::arg("device"), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("masters"), py::arg("steps"), py::arg("numels"),
        py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"),
        py::arg("maximize"), py::arg("lr_ptr"), py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"),
        py::arg("stream"), py::arg("num_threads"));
  m.def("lion_step", &lion_step_py, "One fused Lion step over a list of tensors", py::arg("device"),
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("masters"), py::arg("numels"),
        py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("weight_decay"), py::arg("maximize"), py::arg("lr_ptr"),
        py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"), py::arg("stream"), py::arg("num_threads"));
  m.def("adam8bit_step", &adam8bit_step_py, "One fused blockwise 8-bit Adam/AdamW step over a list of tensors",
        py::arg("device"), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_absmaxs"),
        py::arg("exp_avg_sqs"), py::arg("exp_avg_sq_absmaxs"), py::arg("masters"), py::arg("steps"),
        py::arg("numels"), py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("signed_map"),
        py::arg("unsigned_map"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"), py::arg("lr_ptr"),
        py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"), py::arg("stream"), py::arg("num_threads"));
  m.def("lion8bit_step", &lion8bit_step_py, "One fused Lion step with blockwise 8-bit momentum",
        py::arg("device"), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_absmaxs"),
        py::arg("masters"), py::arg("numels"), py::arg("param_dtype"), py::arg("grad_dtype"),
        py::arg("signed_map"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
        py::arg("maximize"), py::arg("lr_ptr"), py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"),
        py::arg("stream"), py::arg("num_threads"));
  m.def("muon_prepare", &muon_prepare_py,
        "Muon momentum step fused with the per-matrix norm and the bf16 cast of the Newton-Schulz input",
        py::arg("device"), py::arg("grads"), py::arg("buffers"), py::arg("outs"), py::arg("numels"),
        py::arg("buffer_dtype"), py::arg("grad_dtype"), py::arg("momentum"), py::arg("nesterov"), py::arg("eps"),
        py::arg("safety"), py::arg("partials"), py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"),
        py::arg("stream"), py::arg("num_threads"));
  m.def("muon_apply", &muon_apply_py, "Muon update p = p (1 - lr wd) - lr lr_factor O over same-shape matrices",
        py::arg("device"), py::arg("params"), py::arg("outs"), py::arg("numels"), py::arg("param_dtype"),
        py::arg("lr"), py::arg("weight_decay"), py::arg("lr_factor"), py::arg("lr_ptr"), py::arg("found_inf_ptr"),
        py::arg("stream"), py::arg("num_threads"));
  m.def(
      "symmetric_gram",
      [](uintptr_t x, uintptr_t c, uintptr_t out, int64_t batch, int64_t rows, int64_t cols, double alpha, double beta,
         uintptr_t stream) {
        GramLaunch L;
        L = {x, c, out, batch, rows, cols, float(alpha), float(beta), stream};
        py::gil_scoped_release release;
        symmetric_gram_cuda(L);
      },
      "CUDA: out = alpha X X^T + beta C over a batch of bf16 matrices, upper-triangle tiles only",
      py::arg("x"), py::arg("c"), py::arg("out"), py::arg("batch"), py::arg("rows"), py::arg("cols"),
      py::arg("alpha"), py::arg("beta"), py::arg("stream"));
  m.def("chunk_size", []() { return int64_t(1) << 14; }, "Elements per work item / CUDA chunk (sizes workspaces)");
  m.def("quant_map_bytes", []() { return int(sizeof(math::QuantMap)); },
        "Size of the buffer build_quant_map fills (a math::QuantMap)");
  m.def("build_quant_map", &build_quant_map,
        "256 sorted fp32 values -> a math::QuantMap (map + search tables); coarse=False omits the table of the "
        "AVX-512 VBMI byte-permute quantizer, so the AVX-512 tier gathers whatever set_cpu_quantizer says (for tests)",
        py::arg("values"), py::arg("out"), py::arg("coarse") = true);
  m.def("quant_map_has_coarse_table",
        [](uintptr_t map) { return reinterpret_cast<const math::QuantMap*>(map)->coarse.ok != 0; },
        "Whether a built math::QuantMap holds the AVX-512 VBMI quantizer's table (math/quant8_coarse.h)",
        py::arg("map"));
  m.def("cpu_quantizer", &cpu_quantizer,
        "The quantizer the CPU loops run for a built map at the current instruction-set tier: 'scalar', "
        "'avx2', 'avx512 gather' or 'avx512 byte permutes' (VBMI, a map with the coarse table, and an AMD CPU "
        "or set_cpu_quantizer('byte_permutes'))",
        py::arg("map"));
  m.def(
      "quantize_blockwise",
      [](uintptr_t src, int64_t n, uintptr_t map, uintptr_t codes, uintptr_t absmax, int num_threads) {
        py::gil_scoped_release release;
        quantize_blockwise_cpu(src, n, map, codes, absmax, num_threads);
      },
      "n fp32 values (CPU) -> uint8 codes + one fp32 absmax per 256-element block", py::arg("src"), py::arg("n"),
      py::arg("map"), py::arg("codes"), py::arg("absmax"), py::arg("num_threads"));
  m.def(
      "dequantize_blockwise",
      [](uintptr_t codes, uintptr_t absmax, int64_t n, uintptr_t map, uintptr_t dst, int num_threads) {
        py::gil_scoped_release release;
        dequantize_blockwise_cpu(codes, absmax, n, map, dst, num_threads);
      },
      "uint8 codes + per-block absmax (CPU) -> n fp32 values", py::arg("codes"), py::arg("absmax"), py::arg("n"),
      py::arg("map"), py::arg("dst"), py::arg("num_threads"));
  m.def(
      "convert",
      [](uintptr_t src, int src_dtype, uintptr_t dst, int dst_dtype, int64_t n) {
        py::gil_scoped_release release;
        convert_cpu(src, DType(src_dtype), dst, DType(dst_dtype), n);
      },
      "Cast n elements on the CPU with fusedopt's own rounding (for tests)");
  m.def("cpu_isa", &cpu_isa, "Instruction set of the CPU loops: baseline, avx2 or avx512");
  m.def("set_cpu_isa_limit", &set_cpu_isa_limit, "Cap the CPU loops' instruction set (baseline, avx2, avx512)",
        py::arg("name"));
  m.def("set_cpu_quantizer", &set_cpu_quantizer,
        "Pick the AVX-512 VBMI CPU's quantizer: auto (byte permutes on AMD, gather elsewhere), byte_permutes or "
        "gather; the codes are the same",
        py::arg("name"));
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_archs", &cuda_archs);
  m.def("cuda_runtime_version", &cuda_runtime_version);
}
