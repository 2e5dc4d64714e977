"""The packages follow the pipeline: each stage imports only the stages before it.

    capture → dims → costmodel → strategies → solver → codegen → planner (the public driver)

`runtime` is the library the generated program calls: it imports no compiler stage, and only
codegen and the driver import it. Planning (`planner.plan`) loads nothing of the runtime.

One exception: `seqshard.codegen.kernels`, the Triton kernels seqshard writes (the fused loss,
the ring's merge, the layout copies around all-to-alls), is a leaf inside codegen: it imports no
seqshard module outside itself, and the runtime, which calls its kernels as the generated
program does, may import it and nothing else of codegen.

A failure names the import that points to a later stage or closes a cycle: move the code it
needs into the earlier stage, or pass the value in, rather than importing back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import seqshard

ROOT = Path(seqshard.__file__).parent

STAGES = ["capture", "dims", "costmodel", "strategies", "solver", "codegen", "planner"]
"""Compiler stages in the order data flows."""
LEAVES = {"runtime", "models"}
"""Packages outside the pipeline: they import no other seqshard package."""
RUNTIME_USERS = {"codegen", "planner"}
"""The stages that may import the runtime (codegen emits calls to it; the driver runs them)."""
TOP = {"cli", "demo", "testing", "__main__", "__init__"}
"""Top-level modules: tools on top of everything; they may import any package."""
KERNELS = "seqshard.codegen.kernels"
"""A leaf inside codegen (generated kernels that both the emitted program and the runtime call):
it imports only itself, and it is the one part of codegen the runtime may import."""


def package_of(module: str) -> str:
    """'seqshard.strategies.layout' → 'strategies'; 'seqshard.cli' → 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def allowed_import(module: str, target: str) -> bool:
    """Whether `module` may import `target` (full module names): the kernels' exception, then
    the rule between their packages."""
    if within(module, KERNELS):
        return within(target, KERNELS)
    if within(target, KERNELS) and package_of(module) == "runtime":
        return True
    return allowed(package_of(module), package_of(target))


def allowed(src: str, dst: str) -> bool:
    if src == dst or src in TOP:
        return True
    if src in LEAVES:
        return False
    if dst == "runtime":
        return src in RUNTIME_USERS
    if dst == "models" or dst in TOP:
        return False  # built-in models and tools are for users, tests and the CLI
    if src not in STAGES or dst not in STAGES:
        return False  # an unknown package: name its place in the pipeline here
    return STAGES.index(dst) <= STAGES.index(src)


def imports(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    """module → [(imported seqshard module, line, at module level)] for every .py under root."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_pkg else parts)
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node in tree.body:
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks count as module level too
                top_level.update(id(n) for n in node.body)
        found = []
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base if is_pkg else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if _is_module(root, f"{target}.{a.name}")]
                # `from seqshard import solver` imports the submodule, `from .x import f` the module
                names = subs if subs and len(subs) == len(node.names) else [target] + subs
            for name in names:
                if name == "seqshard" or name.startswith("seqshard."):
                    found.append((name, node.lineno, id(node) in top_level))
        out[module] = found
    return out


def _is_module(root: Path, name: str) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").exists()


def layering_errors(root: Path) -> list[str]:
    graph = imports(root)
    errors = []
    for module, found in graph.items():
        src = package_of(module)
        for target, line, _ in found:
            dst = package_of(target)
            if target != "seqshard" and not allowed_import(module, target):
                errors.append(f"{module}:{line} imports {target}: {src!r} may not import "
                              f"{dst!r} (pipeline {' → '.join(STAGES)}; runtime, models and "
                              f"{KERNELS} are leaves; the runtime may import {KERNELS})")
    # cycles among modules, module-level imports only (a package's __init__ counts as a module)
    edges = {m: {t for t, _, top in found if top and t in graph and t != m} for m, found in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                errors.append("import cycle: " + " → ".join(cycle))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return errors


def test_every_import_points_to_an_earlier_stage():
    errors = layering_errors(ROOT)
    assert not errors, "\n".join(errors)


def test_layering_check_can_fail(tmp_path):
    """The check itself: a strategy module importing the solver (a later stage) is reported."""
    pkg = tmp_path / "seqshard"
    for p in ("strategies", "solver"):
        (pkg / p).mkdir(parents=True)
        (pkg / p / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "strategies" / "bad.py").write_text("from seqshard.solver import model\n")
    (pkg / "solver" / "model.py").write_text("from seqshard.strategies import bad\n")
    errors = layering_errors(pkg)
    assert any("seqshard.strategies.bad:1 imports seqshard.solver" in e for e in errors), errors
    assert any(e.startswith("import cycle") for e in errors), errors


def test_kernels_exception_is_exactly_runtime_to_kernels(tmp_path):
    """The runtime may import seqshard.codegen.kernels and nothing else of codegen; the kernels
    import no seqshard module outside themselves."""
    pkg = tmp_path / "seqshard"
    for p in ("runtime", "codegen", "codegen/kernels", "strategies"):
        (pkg / p).mkdir(parents=True)
        (pkg / p / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "codegen" / "sharder.py").write_text("")
    (pkg / "strategies" / "layout.py").write_text("")
    (pkg / "codegen" / "kernels" / "k.py").write_text("from seqshard.codegen.kernels import j\n")
    (pkg / "codegen" / "kernels" / "j.py").write_text("import torch\n")
    (pkg / "runtime" / "ok.py").write_text("from seqshard.codegen.kernels import k\n")
    (pkg / "runtime" / "bad.py").write_text("from seqshard.codegen import sharder\n")
    (pkg / "codegen" / "kernels" / "bad.py").write_text(
        "import seqshard.runtime.ok\nfrom seqshard.strategies import layout\n")
    errors = layering_errors(pkg)
    assert sorted(e.split(" imports ")[0] for e in errors) == [
        "seqshard.codegen.kernels.bad:1", "seqshard.codegen.kernels.bad:2",
        "seqshard.runtime.bad:1"], errors


def test_kernels_load_nothing_else_of_codegen():
    """Importing the runtime (which imports seqshard.codegen.kernels) loads no other module of
    codegen or of any compiler stage: seqshard/codegen/__init__.py imports its names lazily."""
    code = ("import sys\n"
            "import seqshard.runtime, seqshard.codegen.kernels.linear_ce\n"
            "print(sorted(m for m in sys.modules if m.startswith('seqshard.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip())
    assert "seqshard.codegen.kernels.a2a_layout" in loaded, loaded
    others = [m for m in loaded if not (within(m, "seqshard.runtime") or within(m, KERNELS)
                                        or m == "seqshard.codegen")]
    assert not others, f"importing the runtime and the kernels loaded {others}"


def test_planning_loads_no_runtime():
    """`planner.plan` on a meta-device model imports nothing from seqshard.runtime (custom ops,
    torch.distributed groups, the peer transport)."""
    code = (
        "import sys\n"
        "from seqshard import planner\n"
        "from seqshard.models import build\n"
        "model, inputs = build('llama', 'tiny', device='meta', seq=64)\n"
        "plan = planner.plan(model, inputs, cluster='h200x4')\n"
        "assert plan.attention(), 'planned no attention node'\n"
        "print(sorted(m for m in sys.modules if m.startswith('seqshard.runtime')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"planning loaded {out.stdout.strip()}"
