"""Point mlx-lm's own SwitchGLU / SwitchMLP at a bank's arrays, component by component.

A bank holds one array per record component (``layouts/FORMAT.md``), ``[slots, *shape]``. Each
projection (``gate_proj``, ``up_proj``, ``down_proj``; or ``fc1``, ``fc2``) becomes a
``QuantizedSwitchLinear`` over its components found by name: ``weight``, ``scales`` and, where the
layout has them, ``biases`` (affine only), ``global_scale`` (nvfp4) and ``bias`` (expert linear
biases). Its ``__call__`` is mlx-lm's, indexed by slot ids instead of expert ids.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..layouts.index import Component


def bank_linear(parts: dict[str, mx.array], comp: Component) -> QuantizedSwitchLinear:
    """A QuantizedSwitchLinear over existing bank arrays (its __init__ would draw random weights);
    ``parts`` by part name (``weight``, ``scales``...), ``comp`` the projection's weight component."""
    layer = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(layer)
    layer.group_size = comp.group_size
    layer.bits = comp.bits
    layer.mode = comp.mode
    layer.weight = parts["weight"]
    layer.scales = parts["scales"]
    layer.biases = parts.get("biases")
    layer.global_scale = parts.get("global_scale")
    if "bias" in parts:  # mlx-lm adds it when the module has the key
        layer.bias = parts["bias"]
    layer.freeze()
    return layer


def bind_bank(glu: nn.Module, components: list[Component], arrays: dict[str, mx.array]) -> None:
    """Replace ``glu``'s projections by linears over the bank ``arrays`` (by component name)."""
    projections: dict[str, dict[str, mx.array]] = {}
    weights: dict[str, Component] = {}
    for comp in components:
        proj, _, part = comp.name.rpartition(".")
        projections.setdefault(proj, {})[part] = arrays[comp.name]
        if part == "weight":
            weights[proj] = comp
    for proj, parts in projections.items():
        setattr(glu, proj, bank_linear(parts, weights[proj]))
