"""Dependency rules read from the source: no import circle among engine.control, bridges import no engine."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top, inside functions or under ``TYPE_CHECKING``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph(package: str) -> dict[str, set[str]]:
    files = {module_name(path): path for path in REPO.joinpath(*package.split(".")).rglob("*.py")}
    return {name: imported(path) & set(files) - {name} for name, path in files.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``edges`` (a path that comes back to its start), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_the_control_modules():
    edges = graph("engine.control")
    assert "engine.control.operator" in edges and "engine.control.service" in edges
    assert "engine.control.service" not in edges["engine.control.operator"]
    assert cycle(edges) is None, " -> ".join(cycle(edges) or [])


def test_bridges_import_nothing_from_engine():
    for path in REPO.joinpath("bridges").rglob("*.py"):
        engine = sorted(name for name in imported(path) if name == "engine" or name.startswith("engine."))
        assert not engine, f"{path.relative_to(REPO)} imports {engine}"


def engine_imports(path: Path) -> list[str]:
    return sorted(name for name in imported(path) if name == "engine" or name.startswith("engine."))


def test_the_stream_math_imports_only_itself():
    """engine/stream is the StreamDiffusion math: schedulers apart from weights and orchestration."""
    for path in REPO.joinpath("engine", "stream").rglob("*.py"):
        others = [name for name in engine_imports(path) if not name.startswith("engine.stream")]
        assert not others, f"{path.relative_to(REPO)} imports {others}"


def test_control_tempo_modulation_and_midi_import_no_torch():
    """The control surfaces answer while a model loads or a build runs, musical time and the
    modulators run once per frame on plain floats, and MIDI mappings load without a model: no torch
    import in any of them."""
    folders = [REPO.joinpath("engine", name) for name in ("control", "tempo", "modulation", "midi")]
    for path in (path for folder in folders for path in folder.rglob("*.py")):
        torch = sorted(name for name in imported(path) if name == "torch" or name.startswith("torch."))
        assert not torch, f"{path.relative_to(REPO)} imports {torch}"


def test_the_backends_models_and_surfaces_name_no_extension():
    """Exporters, runners, the model side, the math and the control surfaces ask the registry
    (``engine.extensions.registered``); none imports an extension's module by name."""
    builtins = {"sdxl", "controlnet", "ip_adapter", "cross_frame", "feature_cache"}
    for folder in ("accel", "models", "stream", "control", "config"):
        for path in REPO.joinpath("engine", folder).rglob("*.py"):
            named = [n for n in engine_imports(path) if n.split(".")[:2] == ["engine", "extensions"]
                     and len(n.split(".")) > 2 and n.split(".")[2] in builtins]
            assert not named, f"{path.relative_to(REPO)} imports {named}"


def test_midi_mappings_import_no_mido():
    """Mapping files are checked without the ``midi`` extra: only the port adapters import mido (the
    service inside ``import_mido``, the in-memory backend because it is one)."""
    adapters = {"service.py", "loopback.py"}
    for path in REPO.joinpath("engine", "midi").rglob("*.py"):
        mido = sorted(name for name in imported(path) if name.split(".")[0] in ("mido", "rtmidi"))
        assert not mido or path.name in adapters, f"{path.relative_to(REPO)} imports {mido}"
    service = (REPO / "engine" / "midi" / "service.py").read_text(encoding="utf-8")
    assert "\nimport mido" not in service and "\nfrom mido" not in service, "mido only inside import_mido"
