"""Run a flat ATen graph as a plain Python function with its attributes bound once.

A ``GraphModule``'s generated ``forward`` looks every weight up through the module tree
(``getattr(self.model.layers, "0").self_attn.q_proj.weight``, a chain of
``nn.Module.__getattr__`` calls) and every op up through ``torch.ops`` on every call, and
enters each op through ``OpOverload.__call__``. For a graph called once per generated
token, :class:`GraphFunction` does those lookups once: it compiles the graph to a function
whose globals hold the op handles and constants, and :meth:`GraphFunction.bind` puts the
attribute values (looked up at bind time, so that a module whose weights were swapped is
seen as it is) next to them. Like FX's code, it frees each intermediate after its last
use.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx


def _op_handle(target: Any) -> Any:
    # OpOverload.__call__ is `return self._op(*args, **kwargs)`: call the handle directly.
    if isinstance(target, torch._ops.OpOverload):
        return getattr(target, "_op", target)
    return target


class GraphFunction:
    """A graph compiled to Python once; :meth:`bind` makes a callable of it.

    The callable takes the graph's placeholders positionally and returns what its output
    node returns (a tuple for a tuple output).
    """

    def __init__(self, graph: torch.fx.Graph, name: str = "graph_function"):
        self.name = name
        self.attributes: list[str] = []
        # What each call runs, by op (for inspection and tests).
        self.op_counts: Counter[str] = Counter()
        self._globals: dict[str, Any] = {}
        names: dict[torch.fx.Node, str] = {}
        constants: dict[int, str] = {}

        def constant(value: Any) -> str:
            key = id(value)
            if key not in constants:
                constants[key] = f"_c{len(constants)}"
                self._globals[constants[key]] = value
            return constants[key]

        def render(value: Any) -> str:
            if isinstance(value, torch.fx.Node):
                return names[value]
            if isinstance(value, list):
                return "[" + ", ".join(render(v) for v in value) + "]"
            if isinstance(value, tuple):
                return "(" + "".join(render(v) + ", " for v in value) + ")"
            if value is None or type(value) in (bool, int, str):
                return repr(value)
            if type(value) is float and math.isfinite(value):
                return repr(value)
            return constant(value)

        nodes = list(graph.nodes)
        last_use: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes:
            for used in node.all_input_nodes:
                last_use[used] = node
        frees: dict[torch.fx.Node, list[str]] = {}

        params: list[str] = []
        body: list[str] = []
        attr_slots: dict[str, str] = {}
        for index, node in enumerate(nodes):
            var = f"v{index}"
            names[node] = var
            if node.op == "placeholder":
                params.append(var)
                if node not in last_use:
                    body.append(f"    del {var}")
                else:
                    frees.setdefault(last_use[node], []).append(var)
                continue
            if node.op == "get_attr":
                if node.target not in attr_slots:
                    attr_slots[node.target] = f"_a{len(self.attributes)}"
                    self.attributes.append(node.target)
                names[node] = attr_slots[node.target]
                continue
            if node.op == "output":
                body.append(f"    return {render(node.args[0])}")
                continue
            if node.op != "call_function":
                raise ValueError(f"{name}: cannot run node {node.name} ({node.op})")
            self.op_counts[str(node.target)] += 1
            fn = constant(_op_handle(node.target))
            args = [render(a) for a in node.args]
            args += [f"{k}={render(v)}" for k, v in node.kwargs.items()]
            body.append(f"    {var} = {fn}({', '.join(args)})")
            for freed in frees.pop(node, []):
                body.append(f"    del {freed}")
            if node in last_use:
                frees.setdefault(last_use[node], []).append(var)
            else:
                body.append(f"    del {var}")
        source = f"def {name}({', '.join(params)}):\n" + "\n".join(body) + "\n"
        self.source = source
        self._code = compile(source, f"<{name}>", "exec")

    def bind(self, root: torch.nn.Module | None, **constants: Any) -> Callable[..., Any]:
        """The graph as a function, its ``get_attr`` values read from ``root`` now."""
        scope = dict(self._globals)
        for index, target in enumerate(self.attributes):
            scope[f"_a{index}"] = operator.attrgetter(target)(root)
        scope.update(constants)
        exec(self._code, scope)  # defines the function, its globals the bound scope
        return scope[self.name]


__all__ = ["GraphFunction"]
