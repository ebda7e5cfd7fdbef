"""The package's own structure: no import cycles, each shared name defined once."""
import ast
import pathlib

import gtar_logd

PKG = pathlib.Path(gtar_logd.__file__).resolve().parent


def _modules():
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in PKG.glob("*.py")}


def _imports(tree):
    """Modules of this package that `tree` imports, at any depth (lazy imports count)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gtar_logd."):
            out.add(node.module.split(".")[1])
    return out


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {m: _imports(t) & set(mods) - {"__init__"} for m, t in mods.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    cycles = sorted(m for m in graph if m != "__init__" and m in reach(m))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_each_constant_function_and_class_is_defined_once():
    where = {}
    for mod, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()]
            else:
                continue
            for n in names:
                where.setdefault(n, []).append(mod)
    dup = {n: ms for n, ms in where.items() if len(ms) > 1}
    assert not dup, dup
