"""The layout rules the code base keeps (issue 10): no import cycle among streamquant's modules, no branching on
model_type outside the architecture registry, `plan` and `run --dry-run` print one plan."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import last_json, run_cli

REPO = Path(__file__).resolve().parents[1]
# where each installed package lives in the repo (pyproject.toml's package-dir)
PACKAGES = {"streamquant": REPO / "streamquant", "streamquant.kernels": REPO / "kernels", "streamquant.cli": REPO / "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """streamquant modules `name` imports, at module level or inside functions (a lazy import that closes a cycle
    is still a cycle: it only moves the failure to run time)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_cycle():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert graph["streamquant.spec"] and "streamquant.qblock" not in graph["streamquant.spec"]


def test_only_the_registry_branches_on_model_type():
    pattern = re.compile(r"model_type\s*(==|!=)|model_type\s+in\s|== *\"(llama|mistral|qwen2)\"")
    offenders = [f"{path.relative_to(REPO)}:{n}" for name, path in modules().items() if name != "streamquant.arch"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_plan_equals_dry_run(tiny_models):
    """Same options, same plan: micro-batch, per-stage GPU and host bytes (host above each process's own
    baseline, which is measured), output size."""
    opts = ["--samples", "8", "--seqlen", "64", "--weights", "gptq", "--group-size", "16", "--eval", "default"]
    for extra in ([], ["--device", "cuda", "--gpu-mem", "1GiB"]):
        plan = last_json(run_cli("plan", str(tiny_models["qwen2"]), *opts, *extra, "--json").stdout)
        dry = last_json(run_cli("run", str(tiny_models["qwen2"]), *opts, *extra, "--dry-run", "--json").stdout)
        for p in (plan, dry):
            for stage in p["stages"].values():
                stage["host_bytes"] -= p["base_host_bytes"]
            for key in ("peak_host_bytes", "base_host_bytes"):
                p.pop(key)
        assert plan == dry
        assert plan["device"] == ("cuda" if extra else "cpu") and plan["output_bytes"] > 0
