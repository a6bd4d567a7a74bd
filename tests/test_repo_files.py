"""The configs and manifests the repo ships are valid (a stale example is a bug)."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from pathopeft.cli import _build_batch_config, build_parser
from pathopeft.wsi.config import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs" / "wsi").glob("*.yaml")), ids=lambda p: p.name)
def test_wsi_configs_parse(cfg, tmp_path):
    args = build_parser().parse_args(
        ["wsi", "process", "--slides", "x.svs", "--out", str(tmp_path), "--config", str(cfg)]
    )
    bc = _build_batch_config(args, features=True)
    assert bc.tiling.target_mpp > 0
    assert bc.extract.backbone


@pytest.mark.shared
def test_test_slides_manifest_points_at_shared(shared_dir):
    if shared_dir.resolve() != (ROOT.parent / "shared").resolve():
        pytest.skip("the manifest's relative paths assume ../shared beside the repo")
    entries = read_manifest(ROOT / "data_manifests" / "test_slides.csv")
    assert len(entries) == 6
    missing = [e.path for e in entries if not e.path.is_file()]
    assert not missing, f"manifest paths not found: {missing}"


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs" / "mil").glob("*.yaml")), ids=lambda p: p.name)
def test_mil_configs_parse(cfg):
    from pathopeft.mil.continual import load_config
    from pathopeft.mil.models import create_mil_model

    c = load_config(cfg)
    assert c.tasks
    create_mil_model(c.model, in_dim=8, n_classes=len(c.classes), **c.model_kwargs)  # kwargs fit the model


# --- no import cycles between pathopeft modules ---------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions or classes, not under TYPE_CHECKING."""
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                todo += [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            todo += [*node.body, *node.orelse, *node.finalbody, *(s for h in node.handlers for s in h.body)]
        elif isinstance(node, ast.With):
            todo += node.body


def import_graph() -> dict[str, set[str]]:
    """Module → the pathopeft modules it imports at module level (``from pkg import sub`` names the submodule)."""
    files = {_module_name(p): p for p in sorted((ROOT / "pathopeft").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
                continue
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                deps.add(sub if sub in files else base)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, …, a]``, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_pathopeft_modules():
    """A cycle works only by import order (a registry filled from a half-imported package); forbid them."""
    graph = import_graph()
    assert "pathopeft.adapters.core" in graph["pathopeft.adapters.salt.layer"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# --- README lists of plugins stay true to the registries ---------------------------------------------------------
def test_readme_names_every_registered_plugin():
    """The README names plugins in prose; a newly registered one that the README does not mention is a stale doc."""
    from pathopeft.adapters import ADAPTERS
    from pathopeft.mil.models import MIL_MODELS
    from pathopeft.mil.strategies import STRATEGIES
    from pathopeft.seg.model import SEG_DECODERS
    from pathopeft.text_encoders import TEXT_ENCODERS

    readme = (ROOT / "README.md").read_text().lower()
    missing = {
        kind: [n for n in names if n.lower() not in readme]
        for kind, names in {
            "adapter": [n for n in ADAPTERS if n != "dense-masked"],
            "MIL model": list(MIL_MODELS),
            "strategy": list(STRATEGIES),
            "seg decoder": list(SEG_DECODERS),
            "text encoder": list(TEXT_ENCODERS),
        }.items()
    }
    assert not any(missing.values()), f"README.md does not mention: {missing}"
