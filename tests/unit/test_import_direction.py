"""One import direction (worker/__init__.py): read every source module's imports with `ast` and check them
against the layers, then import the lower layers in a fresh interpreter and check no model code came along.

A lower layer never imports a higher one; only the programs (`worker.cli`, `worker.demo`) import
`headless_*`; the store, the loop and the shared vocabulary import no model code at all, and the live
layer only inside the functions that probe the device.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("worker", "wan_engine", "headless_model_management", "headless_wgp", "travel_between_images")
MODEL_CODE = ("torch", "diffusers", "transformers", "accelerate", "peft", "wan_engine", "headless_wgp")

# Bottom to top: a module may import its own layer and the layers listed before it.
LAYERS: list[tuple[str, ...]] = [
    ("wan_engine",),
    ("headless_wgp", "travel_between_images"),
    ("worker.task", "worker.logs"),
    ("worker.store",),
    ("worker.config",),
    ("worker.loop",),
    ("worker.live",),
    ("worker.tasks",),
    ("worker.processes",),
    ("headless_model_management",),
    ("worker.cli", "worker.demo", "worker.__main__", "worker"),
]
# What each engine-side layer may import, besides itself: the engine knows nothing of the worker.
ENGINE_ALLOWED = {
    "wan_engine": ("wan_engine",),
    "headless_wgp": ("wan_engine",),
    "travel_between_images": ("wan_engine.video_io", "wan_engine.limits"),
}
# The one upward edge: the live layer names the model a queued row needs, a pure function of the row.
UPWARD_EXCEPTIONS = {("worker.live", "worker.tasks.params")}
NO_MODEL_CODE = ("worker.task", "worker.logs", "worker.config", "worker.store", "worker.loop")
LAZY_MODEL_CODE_ONLY = ("worker.live",)
HEADLESS_IMPORTERS = ("worker.cli", "worker.demo", "headless_model_management", "headless_wgp")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    top_level: bool  # at module level (or in a module-level if/try), not inside a function


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> list[Path]:
    files = [REPO_ROOT / f"{name}.py" for name in FIRST_PARTY if (REPO_ROOT / f"{name}.py").exists()]
    for package in ("worker", "wan_engine"):
        files += sorted(p for p in (REPO_ROOT / package).rglob("*.py") if "migrations" not in p.parts)
    return files


def _imports(path: Path) -> list[Import]:
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module]
        else:
            continue
        found += [Import(module, target, node.lineno, id(node) not in in_function) for target in targets]
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer_of(module: str) -> int:
    best, index = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if _within(module, prefix) and len(prefix) > best:
                best, index = len(prefix), i
    assert index >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return index


def _layer_name(module: str) -> str:
    return max((p for layer in LAYERS for p in layer if _within(module, p)), key=len)


ALL_IMPORTS = [imp for path in _source_files() for imp in _imports(path)]
FIRST_PARTY_IMPORTS = [imp for imp in ALL_IMPORTS if imp.target.split(".")[0] in FIRST_PARTY]


def test_the_scan_sees_the_whole_tree() -> None:
    importers = {imp.importer for imp in FIRST_PARTY_IMPORTS}
    for expected in ("worker.store.repository", "worker.loop.worker", "worker.tasks.runner", "worker.cli"):
        assert any(_within(name, expected) for name in importers), expected


def test_no_layer_imports_a_higher_one() -> None:
    wrong = []
    for imp in FIRST_PARTY_IMPORTS:
        if _layer_of(imp.target) <= _layer_of(imp.importer):
            continue
        if any(_within(imp.importer, a) and _within(imp.target, b) for a, b in UPWARD_EXCEPTIONS):
            continue
        wrong.append(f"{imp.importer}:{imp.line} imports {imp.target}")
    assert wrong == []


def test_the_engine_imports_nothing_of_the_worker() -> None:
    wrong = []
    for imp in FIRST_PARTY_IMPORTS:
        allowed = next((v for k, v in ENGINE_ALLOWED.items() if _within(imp.importer, k)), None)
        if allowed is not None and not any(_within(imp.target, a) for a in allowed):
            wrong.append(f"{imp.importer}:{imp.line} imports {imp.target}")
    assert wrong == []


def test_only_the_programs_import_headless_modules() -> None:
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in FIRST_PARTY_IMPORTS
        if imp.target.startswith("headless_") and not any(_within(imp.importer, h) for h in HEADLESS_IMPORTERS)
    ]
    assert wrong == []


@pytest.mark.parametrize("layer", NO_MODEL_CODE + LAZY_MODEL_CODE_ONLY)
def test_lower_layers_import_no_model_code(layer: str) -> None:
    lazy_ok = layer in LAZY_MODEL_CODE_ONLY
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _layer_name(imp.importer) == layer
        and any(_within(imp.target, m) for m in MODEL_CODE)
        and (imp.top_level or not lazy_ok)
    ]
    assert wrong == []


def test_importing_the_lower_layers_loads_no_model_code() -> None:
    modules = [
        "worker.store.repository",
        "worker.store.migrate",
        "worker.loop.worker",
        "worker.config",
        "worker.live.events",
        "worker.live.http_server",
        "worker.live.hub",
        "worker.live.follow",
        "worker.tasks.params",
    ]
    probe = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted({{n.split('.')[0] for n in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip()))
    assert loaded.isdisjoint({"torch", "diffusers", "transformers", "headless_wgp", "headless_model_management"})
    assert "wan_engine" not in loaded or _only_pure_engine_modules(modules)


def _only_pure_engine_modules(modules: list[str]) -> bool:
    """`wan_engine.limits` (bounds, no imports) is the one engine module the schema may load."""
    listing = "sorted(n for n in sys.modules if n.startswith('wan_engine'))"
    probe = f"import sys\nfor m in {modules!r}: __import__(m)\nprint({listing})"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return set(ast.literal_eval(out.stdout.strip())) <= {"wan_engine", "wan_engine.limits"}
