"""The ``triton`` backend: fused LSTM / GRU / RNN recurrence kernels written in Triton.

Two kernel shapes serve the same op contract (docs/op-contract.md):

- ``step``: per step, the recurrent GEMM in torch.mm (cuBLAS) and one fused pointwise Triton
  kernel (gate math, state update, workspace); any hidden size.
- ``persistent``: the whole time loop in one launch per direction, recurrent weights held in
  registers, batch tiled across programs; for hidden sizes whose weights fit
  (``persistent.fits``). Its backward also accumulates the weight gradients.

"auto" uses the persistent kernel where it fits, else the step path; FASTRNN_TRITON_KERNEL
(auto | step | persistent) forces one. The options of the lstm / gru ops (layer norm,
recurrent mask, zoneout, clips; fastrnn.spec) run on the step path only: with any option
on, "auto" takes it, and a forced persistent kernel refuses the call. Both share the gate
math in ``_gates``. On CPU the kernels run only under the Triton interpreter
(TRITON_INTERPRET=1 before this package is imported), which the tests use.
"""
from .backend import TritonBackend

BACKEND = TritonBackend()
