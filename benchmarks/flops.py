"""Model FLOPs of a JAX function from its jaxpr: 2 x the multiply-adds of every convolution and
dot product, inside any jit, shard_map, remat, custom_vjp or scan (times its length).

Backend-independent (it never compiles), unlike XLA's cost analysis: XLA:GPU's count of a
compiled program leaves out the cuDNN convolutions, and `Lowered.cost_analysis` is not
implemented for PJRT plugins. Element-wise ops and reductions are not counted: this is the usual
basis of model FLOP utilisation. Under shard_map the count is per device. Dead equations (whose
results nothing uses) are skipped, as XLA removes them; inner jaxprs count in full.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core


def _conv_flops(eqn: core.JaxprEqn) -> int:
  """[N, ..., C_in] * [..., C_in / groups, C_out] -> out: each output element is a dot over the
  kernel's spatial positions and its input features."""
  rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
  per_output = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[d] for d in rhs_spec[2:])
  return 2 * math.prod(out.shape) * per_output


def _dot_flops(eqn: core.JaxprEqn) -> int:
  """out elements x contracted size."""
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params["dimension_numbers"]
  contracted = math.prod(lhs.shape[d] for d in contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _is_live(eqn: core.JaxprEqn, live: set[core.Var]) -> bool:
  return bool(eqn.effects) or any(v in live for v in eqn.outvars if isinstance(v, core.Var))


def jaxpr_flops(jaxpr: core.Jaxpr) -> int:
  """Convolution and dot FLOPs of the live equations of `jaxpr` (XLA removes the dead ones, such
  as the primal a custom VJP's backward pass recomputes and drops); a cond counts its costliest
  branch, a while loop its body once."""
  live = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
  total = 0
  for eqn in reversed(jaxpr.eqns):
    if not _is_live(eqn, live):
      continue
    live.update(v for v in eqn.invars if isinstance(v, core.Var))
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for j in core.jaxprs_in_params(eqn.params))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def model_flops(fn: Callable, *args: Any) -> int:
  """Convolution and dot FLOPs of `fn(*args)` (arrays or ShapeDtypeStructs; nothing runs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
