"""The README's map of the code is the law: imports never run up its five layers, no two units import each other
(directly or round about), every unit is on the map, no file is over 400 lines (a file holds one concept), lint
sees every file, and the cost model never reaches torch.distributed or the benchmark."""
import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tplab"
MAX_LINES = 400


def unit_of(module: str) -> str:
    """tplab.bench.plan -> tplab.bench; tplab.errors -> tplab.errors; tplab -> tplab."""
    return ".".join(module.split(".")[:2])


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    """The tplab modules (and torch.distributed) a file imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "tplab":  # from tplab import launch: the package's public face
                out.update(f"tplab.{a.name}" for a in node.names if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] == "tplab" or m.startswith("torch.distributed")}


def readme_layers() -> dict[str, int]:
    """unit -> layer, from the README's map table (rows like ``| 2 parallel core | `tplab/comm/`, ... | ... |``)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Map of the code"):]
    floors = {}
    for floor, code in re.findall(r"^\| (\d) [\w ]+\| ([^|]+) \|", section, flags=re.M):
        for path in re.findall(r"`(tplab/[\w/.]*)`", code):
            unit = path.removesuffix("/").removesuffix(".py").replace("/", ".")
            floors["tplab" if unit == "tplab.__init__" else unit] = int(floor)
    return floors


def unit_graph() -> dict[str, set[str]]:
    """unit -> the other tplab units it imports."""
    graph = defaultdict(set)
    for module, path in modules().items():
        graph[unit_of(module)] |= {unit_of(t) for t in imports_of(path) if t.startswith("tplab")} - {unit_of(module)}
    return graph


def test_every_unit_is_on_the_readme_map():
    floors = readme_layers()
    assert sorted(set(floors.values())) == [1, 2, 3, 4, 5]
    units = {unit_of(m) for m in modules()}
    assert units - set(floors) == set(), "units missing from the README's map"
    assert set(floors) - units == set(), "the README's map names units that do not exist"


def test_no_import_runs_up_the_layers():
    layers = readme_layers()
    upward = []
    for module, path in modules().items():
        for target in imports_of(path):
            if not target.startswith("tplab"):
                continue
            source_unit, target_unit = unit_of(module), unit_of(target)
            if layers[target_unit] > layers[source_unit]:
                upward.append(f"{module} (layer {layers[source_unit]}) imports {target} "
                              f"(layer {layers[target_unit]})")
    assert upward == []


def test_no_two_units_import_each_other():
    """Within a layer units may use one another, one way: the units' import graph has no cycle."""
    graph = unit_graph()
    cycles = []

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    for unit in list(graph):
        if reaches(unit, unit, set()):
            cycles.append(unit)
    assert cycles == []


def test_the_cost_model_never_reaches_torch_distributed_or_the_benchmark():
    graph = {module: imports_of(path) for module, path in modules().items()}
    reached, todo = set(), [m for m in graph if unit_of(m) == "tplab.perf"]
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        todo.extend(t for t in graph.get(module, ()) if t in graph)
    assert not {m for m in reached if unit_of(m) in ("tplab.comm", "tplab.bench")}
    assert not any(t.startswith("torch.distributed") for m in reached for t in graph[m])


def test_no_file_is_over_400_lines_and_no_module_repeats_its_folder():
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                                                  *(ROOT / "scripts").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    repeated = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                if p.parent != PACKAGE and p.stem.startswith(p.parent.name + "_")]
    assert repeated == []


def test_every_subpackage_names_its_public_face():
    faceless = defaultdict(list)
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        if ast.get_docstring(tree) is None:
            faceless["no docstring"].append(init.parent.name)
    assert dict(faceless) == {}


def test_the_public_names_users_call_are_kept():
    import tplab
    import tplab.layers
    import tplab.perf
    import tplab.serving
    from tplab.model import loading

    assert tplab.launch.__module__ == "tplab.comm.launch" and tplab.Dist.__module__ == "tplab.comm.group"
    assert tplab.layers.ColumnParallelLinear.__module__ == tplab.layers.RowParallelLinear.__module__ == "tplab.layers.linear"
    assert callable(tplab.perf.estimate) and callable(tplab.perf.min_tp)
    assert tplab.from_pretrained is loading.from_pretrained and callable(tplab.generate)
    assert callable(tplab.serving.serve) and callable(tplab.serving.simulate)


def test_lint_covers_every_python_file():
    """ruff skips folders that look like build output (``dist``, ``build``, ...): no file may hide in one."""
    shown = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", "."], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    linted = {Path(line.strip()).resolve() for line in shown.splitlines() if line.strip().endswith(".py")}
    ours = {p.resolve() for folder in ("tplab", "tests", "scripts") for p in (ROOT / folder).rglob("*.py")}
    assert ours - linted == set()
