"""torch.fx views of any classifier: where it can be cut into stages, and which conv each
BatchNorm directly follows. The methods that must see a user's module as a graph (early exits,
weight sharing's BatchNorm folding) ask here; everything else works module by module.

A **cut point** is a node that every path from the input to the output passes through: nothing
computed before it is needed after it (parameters aside, which each stage carries), so the network
splits there into two graphs joined by one tensor — the early-exit stage contract of
`compression.core.exits`. A skip connection that jumps over a node makes it no cut point, so a
residual block can only be cut at its end. The **boundary** of a module is the last node traced
inside it (fx records each node's ``nn_module_stack``): ``layer2`` ends where its last block's
output is computed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from compression.core.errors import Unsupported


@dataclass(frozen=True)
class Cut:
    """A place the network can be split, at a module boundary."""

    node: str  # the fx node whose output crosses the cut
    modules: tuple[str, ...]  # the modules that end here, outermost first (what a config names)
    shape: tuple[int, ...]  # the crossing tensor's shape without the batch axis
    macs: int  # conv + linear multiply-accumulates of one image up to here


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``; a model it cannot trace (data-dependent control flow, …) is
    `Unsupported`, with fx's reason."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises anything from TraceError to TypeError
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__} "
                          f"({type(exc).__name__}: {exc})") from exc


def cuts(gm: fx.GraphModule, input_shape: Sequence[int]) -> list[Cut]:
    """Every cut point of ``gm`` that is a module boundary, in order, with its cumulative MACs."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()  # a dry run must not move BatchNorm statistics
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros((1, *input_shape)))
    for m, mode in modes.items():
        m.training = mode
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    modules = dict(gm.named_modules())
    out: list[Cut] = []
    reach = -1  # the furthest node any earlier node (parameters aside) feeds
    macs = 0
    for i, n in enumerate(nodes):
        macs += _node_macs(n, modules)
        meta = n.meta.get("tensor_meta")
        if (n.op not in ("placeholder", "get_attr", "output") and reach <= i
                and isinstance(meta, TensorMetadata)):
            ending = _ending_modules(n, nodes[i + 1] if i + 1 < len(nodes) else None)
            if ending:
                out.append(Cut(n.name, tuple(ending), tuple(meta.shape[1:]), macs))
        if n.op != "get_attr":
            reach = max(reach, i, *(index[u] for u in n.users))
    return out


def split(gm: fx.GraphModule, at: Sequence[str]) -> list[fx.GraphModule]:
    """``gm`` cut at the named cut-point nodes: len(at) + 1 graphs, each taking the previous
    one's output (the first: the input) and the last returning ``gm``'s output."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    bounds = [by_name[name] for name in at]
    parts: list[fx.GraphModule] = []
    feed: fx.Node | None = None  # the node whose value enters the current part
    pending = [n for n in nodes if n.op != "placeholder"]
    for end in [*bounds, None]:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        x = graph.placeholder("x")
        if feed is None:
            env[next(n for n in nodes if n.op == "placeholder")] = x
        else:
            env[feed] = x

        def lookup(a: fx.Node, graph: fx.Graph = graph, env: dict[fx.Node, fx.Node] = env
                   ) -> fx.Node:
            if a not in env:  # only parameters may come from before the cut
                if a.op != "get_attr":
                    raise ValueError(f"node {a.name!r} crosses the cut: not a cut point")
                env[a] = graph.node_copy(a)
            return env[a]

        while pending:
            n = pending.pop(0)
            if n.op == "output":
                graph.output(fx.map_arg(n.args[0], lookup))
                break
            env[n] = graph.node_copy(n, lookup)
            if n is end:
                graph.output(env[n])
                break
        parts.append(fx.GraphModule(gm, graph))
        feed = end
    return parts


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm2d is the only consumer of the Conv2d's
    output: the pairs that fold into one conv (as the ONNX exporter folds them)."""
    gm = trace(model)
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(modules.get(str(n.target)), nn.BatchNorm2d):
            continue
        src = n.args[0] if n.args else None
        # a module called twice (shared) cannot be folded for one of its calls only
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(str(src.target)), nn.Conv2d) and len(src.users) == 1
                and calls[str(src.target)] == 1 and calls[str(n.target)] == 1):
            pairs.append((str(src.target), str(n.target)))
    return pairs


def _ending_modules(node: fx.Node, after: fx.Node | None) -> list[str]:
    """Modules whose scope ends at ``node`` (outermost first)."""
    def names(n: fx.Node | None) -> list[str]:
        stack = n.meta.get("nn_module_stack") if n is not None else None
        return [qualname for qualname, _ in (stack or {}).values()]

    later = set(names(after))
    return [m for m in names(node) if m not in later]


def _node_macs(n: fx.Node, modules: dict[str, nn.Module]) -> int:
    """Multiply-accumulates of one image through a Conv2d / Linear node (as `profile.count_macs`)."""
    meta = n.meta.get("tensor_meta")
    if n.op != "call_module" or not isinstance(meta, TensorMetadata):
        return 0
    m = modules[str(n.target)]
    per_image = math.prod(meta.shape[1:])
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return per_image * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return per_image * m.in_features
    return 0
