"""Ship the code that rebuilds a compressed model inside its folder, for plain `transformers`.

    AutoModelForSequenceClassification.from_pretrained("model-dir", trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained("model-dir", trust_remote_code=True).generate(...)

Compressed layers have per-layer shapes that stock classes cannot hold; the Hugging Face
convention for that is a modeling file in the folder plus `auto_map` in config.json. The file is
not a hand-kept copy: `modeling_source` cuts it at save time out of finegates' own source. From
the functions `finegates.load` uses to rebuild a model (`ROOTS`), it follows every top-level
name they reference inside finegates (functions, classes, constants such as the `ARCHS` table)
and writes those definitions, dependencies first, under the external imports they use. So the
shipped code is the code `finegates.load` runs, and follows any change to it; a definition that
needs something outside torch/transformers/the standard library fails here, at save time.

The file then defines one class, `Finegates<StockClass>`, a subclass of the stock task class
that rebuilds its blocks at the shapes in `config.finegates` before the weights are read.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

from ..data.files import atomic_write

MODELING_FILE = "modeling_finegates.py"
# What rebuilds a compressed model from config.json (saved.load's steps before the weights load).
# A root re-exported by its module (`from .rebuild import build_block`) ships from where it is defined.
ROOTS = ("finegates.core.arch:spec_for", "finegates.core.arch:blocks", "finegates.compression.rebuild:build_block",
         "finegates.core.pooling:restore_pooling")
_ALLOWED_IMPORTS = frozenset(sys.stdlib_module_names) | {"torch", "transformers"}  # what a transformers user has

_CLASS = '''

# ---- the class transformers loads (auto_map in config.json) -----------------------------------
from transformers import {stock} as _Stock


class {name}(_Stock):
    """`{stock}` rebuilt at the per-layer shapes recorded in `config.finegates` before the
    weights load: the same steps as `finegates.load`, without finegates installed."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        spec = spec_for(self)
        dtype = next(self.parameters()).dtype
        layers = config.finegates["layers"]
        stack = blocks(self, spec)
        if len(stack) != len(layers):
            raise ValueError(f"config.finegates records {{len(layers)}} layers, the model has {{len(stack)}}")
        with torch.device("cpu"):  # from_pretrained builds on "meta"; the layout indices need real tensors
            for i, (block, plan) in enumerate(zip(stack, layers)):
                build_block(block, spec, config, plan, i, dtype)
        restore_pooling(self)
        # from_pretrained replaces non-persistent buffers (the layout indices) by empty ones; keep the real ones
        self._finegates_buffers = [(m, n, b.clone()) for block in stack for m in block.modules()
                                   for n, b in m.named_buffers(recurse=False) if b is not None and b.device.type != "meta"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        out = super().from_pretrained(*args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            for module, name, value in model._finegates_buffers:
                setattr(module, name, value.to(getattr(module, name).device))
        return out
'''


class RemoteCodeError(RuntimeError):
    """The rebuild code cannot be shipped stand-alone (a name or import it cannot carry)."""


class _Module:
    """One finegates module's top-level definitions and import bindings, from its source."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = inspect.getsource(importlib.import_module(name))
        self.defs: dict[str, ast.stmt] = {}
        self.imports: dict[str, tuple[str, str | None]] = {}  # alias -> (module, attribute or None)
        for node in ast.parse(self.source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        self.defs[target.id] = node
            elif isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = self.name.rsplit(".", node.level)[0] + ("." + base if base else "")
                for a in node.names:
                    self.imports[a.asname or a.name] = (base, a.name)

    def segment(self, node: ast.stmt) -> str:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(self.source.splitlines()[start - 1:node.end_lineno])


def _names(node: ast.stmt) -> set[str]:
    """Every bare name the definition reads (an over-approximation: locals included)."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.ImportFrom) and inner.level:
            raise RemoteCodeError(f"line {inner.lineno}: a relative import inside a definition cannot be shipped")
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def modeling_source(stock_class: str, roots: tuple[str, ...] = ROOTS) -> str:
    """The stand-alone modeling file for a compressed `stock_class` (e.g. BertForSequenceClassification)."""
    modules: dict[str, _Module] = {}
    order: list[tuple[str, str]] = []  # (module, name), dependencies first
    owner: dict[str, str] = {}  # shipped name -> its module (names must not collide)
    external: dict[str, tuple[str, str | None]] = {}

    def visit(module: str, name: str) -> None:
        if module not in modules:
            modules[module] = _Module(module)
        mod = modules[module]
        src, attr = mod.imports.get(name, ("", None))
        if name not in mod.defs and src.startswith("finegates") and attr == name:
            return visit(src, attr)  # a root re-exported from another module: ship its definition
        if owner.get(name) == module:
            return
        if name in owner:
            raise RemoteCodeError(f"{module}.{name} and {owner[name]}.{name} would share one name in {MODELING_FILE}")
        if name not in mod.defs:
            raise RemoteCodeError(f"{module} has no top-level definition {name!r}")
        owner[name] = module
        for ref in sorted(_names(mod.defs[name])):
            if ref in mod.defs and ref != name:
                visit(module, ref)
            elif ref in mod.imports:
                src, attr = mod.imports[ref]
                if src.split(".")[0] == "finegates":
                    if attr is None or attr != ref:
                        raise RemoteCodeError(f"{module}: import of {ref!r} must be `from .module import {ref}`")
                    visit(src, attr)
                elif src.split(".")[0] not in _ALLOWED_IMPORTS:
                    raise RemoteCodeError(f"{module}.{name} needs {src!r}, which a plain transformers install may lack")
                elif external.setdefault(ref, (src, attr)) != (src, attr):
                    raise RemoteCodeError(f"{ref!r} is imported from two places ({external[ref]}, {(src, attr)})")
        order.append((module, name))

    for root in roots:
        visit(*root.split(":"))
    lines = [f'"""Rebuilds a finegates-compressed `{stock_class}` with plain transformers (trust_remote_code).',
             "", "Generated by finegates.remote_code from finegates' own source; do not edit.", '"""', "",
             "from __future__ import annotations", ""]
    for alias, (src, attr) in sorted(external.items(), key=lambda kv: (kv[1][1] is not None, kv[1][0], kv[0])):
        if src == "__future__":
            continue
        if attr is None:
            lines.append(f"import {src}" + (f" as {alias}" if alias != src else ""))
        else:
            lines.append(f"from {src} import {attr}" + (f" as {alias}" if alias != attr else ""))
    seen_module = None
    for module, name in order:
        if module != seen_module:
            lines += ["", "", f"# ---- from {module} " + "-" * max(4, 90 - len(module))]
            seen_module = module
        lines += ["", modules[module].segment(modules[module].defs[name]), ""]
    lines.append(_CLASS.format(stock=stock_class, name=class_name(stock_class)))
    return "\n".join(lines)


def class_name(stock_class: str) -> str:
    return f"Finegates{stock_class}"


def auto_class(stock_class: str) -> str | None:
    """The `transformers` Auto class that loads a task class (BertForSequenceClassification ->
    AutoModelForSequenceClassification); None for a class without one."""
    import transformers

    if "For" not in stock_class:
        return None
    name = "AutoModel" + stock_class[stock_class.index("For"):]
    return name if hasattr(transformers, name) else None


def add_remote_code(out_dir, config: dict) -> dict:
    """Write OUT_DIR/modeling_finegates.py for `config`'s compressed model; return `config` with
    `auto_map` pointing at it (the caller writes config.json last)."""
    stock = config["finegates"]["task_class"]
    auto = auto_class(stock)
    if auto is None:
        return config
    source = modeling_source(stock)
    compile(source, MODELING_FILE, "exec")  # a broken file is refused here, not at a user's load
    atomic_write(Path(out_dir) / MODELING_FILE, lambda tmp: Path(tmp).write_text(source))
    return {**config, "auto_map": {auto: f"{MODELING_FILE[:-3]}.{class_name(stock)}"}}
