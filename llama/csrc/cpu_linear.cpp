// The linear-layer ops: y = x W^T for one layer's weights (see kernels.h).
#include "kernels.h"

using namespace llama_kernels;

// x (..., K) float; weight (N, K) fp32/fp16/bf16/int8; scales (N,) float32 or empty -> (..., N) in x's dtype
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  Weight L{weight.scalar_type() == at::kChar ? INT8 : DENSE, N, K, 0, weight, at::Tensor(), at::Tensor()};
  if (L.kind == INT8) {
    TORCH_CHECK(scales.has_value(), "int8 weights need scales");
    L.scales = scales->to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK(!scales.has_value(), "scales are for int8 weights only");
  }
  at::Tensor xf = flat_input(x, K);
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  apply(L, xf.data_ptr<float>(), M, y.data_ptr<float>());
  return shaped_output(y, x, N);
}

// x (..., K); weight (N, K/2) uint8 in 64-value blocks; scales, zeros (N, K/G) of one float dtype
// -> (..., N) in x's dtype
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size) {
  const int64_t N = weight.size(0), K = weight.size(1) * 2, G = group_size;
  check_int4(K, G);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous(), "weight must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == zeros.scalar_type() && scales.is_contiguous() && zeros.is_contiguous() &&
              scales.numel() == N * (K / G) && (zeros.numel() == N * (K / G) || zeros.numel() == 0),
              "scales and zeros must be contiguous, of one dtype and of shape (", N, ", ", K / G,
              ") (zeros may be empty)");
  at::Tensor xf = flat_input(x, K);
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  apply(Weight{INT4, N, K, G, weight, scales, zeros}, xf.data_ptr<float>(), M, y.data_ptr<float>());
  return shaped_output(y, x, N);
}

// x (..., K); weight (N, K/2) uint8 in int4x8_group's layout; scales (N/8, K/32, 8) fp16 -> (..., N)
at::Tensor linear_int4x8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  const int64_t N = weight.size(0), K = weight.size(1) * 2;
  check_int4x8(N, K, weight, scales);
  at::Tensor xf = flat_input(x, K);
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  apply(Weight{INT4X8, N, K, 32, weight, scales, at::Tensor()}, xf.data_ptr<float>(), M, y.data_ptr<float>());
  return shaped_output(y, x, N);
}

TORCH_LIBRARY_FRAGMENT(llama_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? scales) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("linear_int4x8(Tensor x, Tensor weight, Tensor scales) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_int4x8", &linear_int4x8);
}
