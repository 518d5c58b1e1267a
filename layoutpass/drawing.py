"""Pictures of the captured graphs: per graph, the nodes around each pool (its placeholder,
the views of it, the nodes that read or write it, and their neighbours), before and after the
pass side by side, with what changed in colour.

Everything a picture marks is read off the graphs and the report, not guessed: a node is
"removed", "added" or "changed" by comparing the graph as captured with the graph as it runs,
node by node under the same name (a changed node has another op or other inputs); a
permutation is "folded" where the report says the pass folded that op on that source line;
a pool's storage order is the report's. Written as Graphviz DOT by hand (no pydot); graphviz's
`dot` program renders .svg and .png."""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ArgumentError

FORMATS = {".svg": "svg", ".png": "png", ".dot": "dot"}
INSTALL = "install graphviz (apt install graphviz, brew install graphviz or conda install graphviz)"
COLOURS = {"removed": "#f4b6b6", "added": "#b9e4b4", "changed": "#fbd38d", "folded": "#b7d3f7", "pool": "#dccdf5",
           "context": "#f2f2f2", "node": "#ffffff"}
MEANING = {"removed": "removed by the pass", "added": "added by the pass",
           "changed": "changed: another op or inputs",
           "folded": "permutation folded: a free view\nof the pool as now stored\n(as a border: also removed)",
           "pool": "pool (storage order)",
           "context": "its other inputs / users\n(not pool uses)"}


def check_target(path: str, argument: str = "draw") -> str:
    """The format `path`'s suffix asks for; raises, before anything is optimized, when the file
    could not be written: an unknown suffix, no `dot` program for .svg / .png, no such folder."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ArgumentError(argument, f"{path}: cannot tell the picture format from {suffix or 'no suffix'!r}; "
                                      f"end the file name in .svg, .png or .dot")
    if FORMATS[suffix] != "dot" and shutil.which("dot") is None:
        raise ArgumentError(argument, f"rendering {path} needs graphviz's `dot` program, which is not on PATH: "
                                      f"{INSTALL}, or write .dot")
    folder = Path(path).parent
    if not folder.is_dir():
        raise ArgumentError(argument, f"{path}: no folder {str(folder)!r}")
    return FORMATS[suffix]


def numbered(path: str, index: int) -> Path:
    """Where graph `index` is drawn: pic.svg -> pic-3.svg."""
    p = Path(path)
    return p.with_name(f"{p.stem}-{index}{p.suffix}")


def draw(fast, path: str) -> list[tuple[Path, str]]:
    """One picture per captured graph of `fast` (an optimize() result) that reads a pool or that
    the pass changed, at numbered(path, i) where i is the graph's place in fast.graphs. Returns
    (file, graph name) per picture."""
    fmt = check_target(path)
    written = []
    for index, name, source in pictures(fast):
        out = numbered(path, index)
        try:
            if fmt == "dot":
                out.write_text(source)
            else:
                done = subprocess.run(["dot", f"-T{fmt}", "-o", str(out)], input=source, text=True,
                                      capture_output=True)
                if done.returncode:
                    raise OSError((done.stderr.strip().splitlines() or [f"dot exited {done.returncode}"])[0])
        except OSError as err:
            raise ArgumentError("draw", f"cannot write {out}: {err}") from err
        written.append((out, name))
    return written


@dataclass(frozen=True)
class Parts:
    """What one picture is drawn from."""

    name: str
    before: object  # torch.fx.GraphModule, as captured (what the model computes)
    after: object  # torch.fx.GraphModule, as it runs
    pools: dict  # placeholder name -> report.Pool
    uses: list  # report.Use of this graph
    instances: list[str]  # the module paths that run this graph


def parts(fast) -> list[tuple[int, Parts]]:
    """(index in fast.graphs, Parts) of every captured graph."""
    return [(index, Parts(name, graph.captured, graph.module, dict(graph.pools),
                          list(fast.report.entry_uses.get(name, [])), list(graph.instances)))
            for index, (name, graph) in enumerate(fast.graphs.items())]


def pictures(fast) -> list[tuple[int, str, str]]:
    """(index, graph name, DOT source) of every graph that reads a pool or that the pass changed."""
    out = []
    for index, p in parts(fast):
        source = dot(p)
        if source is not None:
            out.append((index, p.name, source))
    return out


# -- what changed ---------------------------------------------------------------------------------

def _signature(node) -> str:
    import torch.fx

    names = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.name)
    return repr((node.op, str(node.target), names))


def changes(before, after) -> dict[str, dict[str, str]]:
    """Per side ("before", "after"): node name -> "removed" / "added" / "changed", comparing the
    two graphs node by node under the same name."""
    b = {n.name: n for n in before.graph.nodes}
    a = {n.name: n for n in after.graph.nodes}
    changed = {name for name in b.keys() & a.keys() if _signature(b[name]) != _signature(a[name])}
    return {"before": {**{n: "removed" for n in b.keys() - a.keys()}, **dict.fromkeys(changed, "changed")},
            "after": {**{n: "added" for n in a.keys() - b.keys()}, **dict.fromkeys(changed, "changed")}}


def _is_view(node) -> bool:
    """An op whose result aliases its input without writing it (transpose, permute, slice...)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or len(schema.returns) != 1:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def around(graph, pools, marked) -> tuple[list, dict]:
    """The nodes to draw, in graph order: each pool placeholder, the views of it, the first
    nodes that read or write those (the pool's uses), and every marked node; and, per drawn
    node, its other inputs and users (the context, drawn as one box each way)."""
    nodes = list(graph.nodes)
    core = set()
    stack = [n for n in nodes if n.op == "placeholder" and n.name in pools]
    while stack:
        node = stack.pop()
        if node in core:
            continue
        core.add(node)
        if node.op == "placeholder" or _is_view(node):
            stack += [u for u in node.users if u.op != "output"]
    core |= {n for n in nodes if n.name in marked}
    context = {}
    for node in core:
        if node.op == "placeholder" and node.name in pools:
            continue
        inputs = [n for n in node.all_input_nodes if n not in core]
        users = [n for n in node.users if n not in core]
        context[node] = (inputs, users)
    return [n for n in nodes if n in core], context


def _names(nodes, most: int = 6) -> str:
    names = [n.name for n in nodes]
    return "\n".join(names[:most] + ([f"+ {len(names) - most} more"] if len(names) > most else []))


# -- DOT ------------------------------------------------------------------------------------------

def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _op(node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return name.removesuffix(".default")


def _shape(node) -> str:
    import torch

    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "(" + ", ".join(str(s) for s in val.shape) + ")"
    return ""


def _tags(node, uses) -> list[str]:
    """The report's verdicts on this node: its uses with the same op and source line."""
    from .report import source_line

    if node.op != "call_function":
        return []
    op = getattr(node.target, "__name__", None) or str(node.target)
    here = [u for u in uses if u.op == op]
    if not here:
        return []
    line = source_line(node)
    return sorted({str(u.action) for u in here if u.source == line})


def _id(side: str, node, suffix: str = "") -> str:
    return _quote(f"{side}_{node.name}{suffix}")


def _side(side: str, pools, uses, marks: dict[str, str], nodes, context, storage: str) -> list[str]:
    title = "before: as captured from the model" if side == "before" else "after: as layoutpass runs it"
    lines = [f"  subgraph cluster_{side} {{", f"    label={_quote(title)};",
             "    fontname=Helvetica; style=rounded; color=\"#999999\";"]
    for node in nodes:
        label = [node.name] + ([_op(node)] if _op(node) != node.name else [])
        shape = _shape(node)
        attrs = {"shape": "box", "style": "filled,rounded", "fillcolor": COLOURS["node"]}
        tags = _tags(node, uses)
        if node.name in pools and node.op == "placeholder":
            pool = pools[node.name]
            order = pool.source if storage == "source" else pool.target
            label = [f"pool {node.target}", f"({', '.join(pool.axes.axes)}) {shape}", f"stored {order}"]
            attrs.update(fillcolor=COLOURS["pool"], penwidth="2", shape="box")
            shape = ""
        if shape:
            label.append(shape)
        if tags:
            label.append("[" + ", ".join(tags) + "]")
        mark = marks.get(node.name)
        if "permutation folded" in tags:
            attrs["fillcolor"] = COLOURS["folded"]
        if mark:
            attrs["fillcolor"] = COLOURS[mark]
            attrs["penwidth"] = "2"
            label.append(mark.upper())
            if "permutation folded" in tags:  # both at once: folded colour as the border
                attrs["color"] = "#2b6cb0"
                attrs["penwidth"] = "4"
        rendered = ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items())
        lines.append(f"    {_id(side, node)} [label={_quote(chr(10).join(label))}, {rendered}];")
    drawn = set(nodes)
    box = f'shape=box, style="filled,dashed", fillcolor={_quote(COLOURS["context"])}, fontcolor="#555555", ' \
          f'color="#aaaaaa", fontsize=9'
    for node in nodes:
        for source in node.all_input_nodes:
            if source in drawn:
                lines.append(f"    {_id(side, source)} -> {_id(side, node)};")
        inputs, users = context.get(node, ((), ()))
        if inputs:
            lines.append(f"    {_id(side, node, '__in')} [label={_quote(_names(inputs))}, {box}];")
            lines.append(f"    {_id(side, node, '__in')} -> {_id(side, node)} [style=dashed, color=\"#aaaaaa\"];")
        if users:
            lines.append(f"    {_id(side, node, '__out')} [label={_quote('used by ' + _names(users))}, {box}];")
            lines.append(f"    {_id(side, node)} -> {_id(side, node, '__out')} [style=dashed, color=\"#aaaaaa\"];")
    lines.append("  }")
    return lines


def dot(p: Parts) -> str | None:
    """The DOT source of one graph's picture, or None when it reads no pool and nothing changed."""
    marks = changes(p.before, p.after)
    if not p.pools and not marks["before"] and not marks["after"]:
        return None
    title = p.name + (f"\nrun by {', '.join(p.instances)}" if p.instances != [""] else "")
    lines = ["digraph layoutpass {", f"  label={_quote(title)}; labelloc=t; fontname=Helvetica; fontsize=16;",
             "  node [fontname=Helvetica, fontsize=11]; edge [color=\"#666666\"]; rankdir=TB;"]
    for side, graph, storage in (("before", p.before.graph, "source"), ("after", p.after.graph, "target")):
        nodes, context = around(graph, p.pools, marks[side])
        lines += _side(side, p.pools, p.uses, marks[side], nodes, context, storage)
    lines.append("  subgraph cluster_legend {")
    lines.append("    label=\"legend\"; fontname=Helvetica; style=rounded; color=\"#cccccc\";")
    for key, meaning in MEANING.items():
        style = "filled,dashed" if key == "context" else "filled,rounded"
        lines.append(f"    legend_{key} [label={_quote(meaning)}, shape=box, style={_quote(style)}, "
                     f"fillcolor={_quote(COLOURS[key])}];")
    keys = list(MEANING)
    lines += [f"    legend_{a} -> legend_{b} [style=invis];" for a, b in zip(keys, keys[1:])]
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
