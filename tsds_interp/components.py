"""One type for the parts of a model that the analyses name, patch, ablate and draw.

A :class:`Component` is a head (``L1H2``, the head's ``hook_z``), an MLP (``L1.mlp``, ``hook_mlp_out``),
a whole attention layer (``L1.attn``, ``hook_attn_out``), the residual stream entering a layer
(``L1.resid``), or an end of the graph (``embed``, ``logits``). It carries its label, its hook name
and how to read or write its slice of that hook's activation, so patching, edges, circuits,
ablation and the command lines all name and hook a component the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from jaxtyping import Float
from torch import Tensor

Kind = Literal["embed", "head", "attn", "mlp", "resid", "logits"]
_HOOKS = {"head": "attn.hook_z", "attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid": "hook_resid_pre"}
_LABEL = re.compile(r"^L(\d+)(?:H(\d+)|\.(attn|mlp|resid))$")


@dataclass(frozen=True)
class Component:
    kind: Kind
    layer: int              # -1 for embed, n_layers for logits
    head: int | None = None

    @property
    def label(self) -> str:
        """``L1H2``, ``L1.mlp``, ``L1.attn``, ``L1.resid``, ``embed`` or ``logits``."""
        if self.kind in ("embed", "logits"):
            return self.kind
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"L{self.layer}.{self.kind}"

    @property
    def hook_name(self) -> str:
        if self.kind == "embed":
            return "hook_embed"
        if self.kind == "logits":
            raise ValueError("the logits are read from the model's output, not from a hook")
        return f"blocks.{self.layer}.{_HOOKS[self.kind]}"

    def read(self, act: Float[Tensor, "batch pos ..."]) -> Tensor:
        """This component's slice of its hook's activation (a view)."""
        return act[:, :, self.head] if self.kind == "head" else act

    def write(self, act: Float[Tensor, "batch pos ..."], value: Tensor) -> Tensor:
        """A copy of ``act`` with this component's slice replaced by ``value`` (broadcast)."""
        act = act.clone()
        self.read(act).copy_(value.expand_as(self.read(act)))
        return act

    @classmethod
    def parse(cls, label: str) -> Component:
        """The component a label names, e.g. ``Component.parse("L0H1")``."""
        if label in ("embed",):
            return cls("embed", -1)
        m = _LABEL.match(label)
        if m is None:
            raise ValueError(f"unknown component {label!r}; components are named like L0H1 or L2.mlp")
        return cls("head", int(m[1]), int(m[2])) if m[2] is not None else cls(m[3], int(m[1]))


def components(model) -> list[Component]:
    """Every head and MLP of ``model``, in layer order (heads before the layer's MLP)."""
    out = []
    for layer in range(model.cfg.n_layers):
        out += [Component("head", layer, h) for h in range(model.cfg.n_heads)]
        out.append(Component("mlp", layer))
    return out


def by_label(model, labels: list[str]) -> list[Component]:
    """The heads and MLPs named ``labels`` (``L1H2``, ``L3.mlp``), with a clear error for unknown ones."""
    known = {c.label: c for c in components(model)}
    bad = [x for x in labels if x not in known]
    if bad:
        raise ValueError(f"unknown component {bad[0]!r}; components are named like L0H1 or L2.mlp")
    return [known[x] for x in labels]
