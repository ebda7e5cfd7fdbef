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


def _needs_cargo():
    import shutil
    import pytest
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not on PATH")


def test_tests_find_the_daemon_in_cargos_target_directory(tmp_path, monkeypatch):
    _needs_cargo()
    from conftest import _default_bin
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path / "tgt"))
    assert _default_bin() == tmp_path / "tgt" / "debug" / "gtar-logd"


def test_test_sh_takes_the_daemon_from_cargos_target_directory(tmp_path):
    """Run test.sh's own lines that pick GTAR_LOGD_BIN, with CARGO_TARGET_DIR set."""
    import os
    import re
    import subprocess
    import sys
    _needs_cargo()
    root = pathlib.Path(__file__).resolve().parents[3]
    script = (root / "test.sh").read_text()
    # Just the two statements (TARGET_DIR=$(...) over two lines, then the
    # export): nothing that could build or test.
    m = re.search(r"^TARGET_DIR=\$\(cargo metadata[^\n]*\n[^\n]*\)\n"
                  r"export GTAR_LOGD_BIN=[^\n]*$", script, re.M)
    assert m, "test.sh no longer sets TARGET_DIR and GTAR_LOGD_BIN as this test expects"
    assert "build" not in m.group(0) and m.group(0).count("\n") == 2, m.group(0)
    env = dict(os.environ, CLIENT=sys.prefix, CARGO_TARGET_DIR=str(tmp_path / "tgt"))
    env.pop("GTAR_LOGD_BIN", None)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", m.group(0) + '\necho "$GTAR_LOGD_BIN"'],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "tgt" / "debug" / "gtar-logd")
