// Schemas of the native ops. Implementations: recurrence_cpu.cpp (CPU) and
// recurrence_cuda.cu (CUDA); fake (meta) impls: fastrnn/backends/native.py.
//
// The public ops fastrnn::{lstm,gru,...}_{forward,backward} are defined from Python in the
// same namespace (torch.library fragments); these names stay distinct from them.
#include <torch/library.h>

#include "generated/fastrnn_spec.h"

// The options (fastrnn/spec.py; FASTRNN_OPTIONS_SCHEMA is generated from it) trail with
// defaults, so calls without them are unchanged; backward then returns the gradients of the
// learnable ones too (empty [0] when absent). need_workspace=false (forward, last): no
// backward follows, the workspace is one step of scratch and comes back empty [0, W].
TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "native_forward(str cell, Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? batch_sizes, bool reverse, " FASTRNN_OPTIONS_SCHEMA
      ", bool need_workspace=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "native_backward(str cell, Tensor grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor output, Tensor workspace, " FASTRNN_OPTIONS_SCHEMA
      ") -> " FASTRNN_BACKWARD_RETURNS);
}
