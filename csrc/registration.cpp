// Schemas of the native ops. Implementations: recurrence_cpu.cpp (CPU) and
// recurrence_cuda.cu (CUDA); fake (meta) impls: fastrnn/backends/native.py.
//
// The public ops fastrnn::{lstm,gru,...}_{forward,backward} are defined from Python in the
// same namespace (torch.library fragments); these names stay distinct from them.
#include <torch/library.h>

// Variant options (VARIANTS_SPEC.md, lstm and gru only) trail with defaults, so calls
// without them are unchanged; backward then returns the gradients of the four layer-norm
// tensors too (empty [0] when absent). need_workspace=false (forward, last): no backward
// follows, the workspace is one step of scratch and comes back empty [0, W].
#define FASTRNN_OPTIONS_SCHEMA                                                               \
  "Tensor? ln_weight=None, Tensor? ln_bias=None, Tensor? ln_c_weight=None, "                 \
  "Tensor? ln_c_bias=None, Tensor? recurrent_mask=None, Tensor? zoneout_h=None, "            \
  "Tensor? zoneout_c=None, float? cell_clip=None, float? proj_clip=None, "                   \
  "float? grad_clip=None"

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "native_forward(str cell, Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? batch_sizes, bool reverse, " FASTRNN_OPTIONS_SCHEMA
      ", bool need_workspace=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "native_backward(str cell, Tensor grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor output, Tensor workspace, " FASTRNN_OPTIONS_SCHEMA
      ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
