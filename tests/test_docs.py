"""The docs name code that exists: every code name docs/method.md cites in backticks (a dotted
`module.name` of this repo, or a function / class name) is defined in the code, so a rename or
a move that leaves the method reference behind fails here."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("distilpose", "pipeline", "jobs", "bench")
METHOD = ROOT / "docs" / "method.md"

# Names method.md cites from the official code (mmpose / mmcv / the DistilPose repo) or from
# PyTorch, to compare with ours: not ours to define.
EXTERNAL = {
    "JointsMSELoss",
    "Reg2HMLoss",
    "TokenDistilLoss",
    "TokenPoseHead",
    "get_model_complexity_info",
    "post_dark_udp",
    "transform_preds",
    "init_transformer_weights",
    "forward_dummy",
    "soft_nms",
    "shift_heatmap",
    "modulate_kernel",
    "patch_to_embedding",
    "scale_with_head",
    "use_gt_bbox",
    "nn.Parameter",
    "nn.MSELoss",
    "cv2.GaussianBlur",
    "numpy.lib.format",
    "torch.save",
    "torch.load",
    "DistilPoseHead",
    "TopDownDistil",
    "TopDownGenerateTarget",
    "TopDownGenerateTargetRegression",
    "nms_thr",
    "running_mean",
    "running_var",
    "num_batches_tracked",
}
# Other libraries' modules method.md quotes dotted names from.
EXTERNAL_MODULES = {"torch", "nn", "cv2", "numpy", "np", "mmpose", "mmcv", "F"}
# Dotted keys that are not code: cache manifest keys (`--expect teacher.precision=...`).
KEYS = {"teacher.precision"}
FILE_SUFFIXES = {"json", "py", "pth", "pt", "csv", "yaml", "png", "md", "tar", "zarr", "onnx"}
BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:\([^`]*\))?`")


def code_files() -> list[Path]:
    return [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")]


def defined_names() -> set[str]:
    """Every function, class, method and module-level or class-level name in the code."""
    names: set[str] = set()
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def module_paths() -> dict[str, list[str]]:
    """Module stem (and dotted tail) -> importable module names of this repo, e.g. "schema" ->
    ["pipeline.cache.schema"], "data.dataset" -> ["distilpose.data.dataset"]."""
    found: dict[str, list[str]] = {}
    for package in ("distilpose", "pipeline"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            for start in range(len(parts)):
                found.setdefault(".".join(parts[start:]), []).append(".".join(parts))
    return found


def cited_names(text: str) -> set[str]:
    return {m.group(1) for m in BACKTICKED.finditer(text)}


def resolve(dotted: str, modules: dict[str, list[str]]) -> bool | None:
    """True if `dotted` names an attribute of one of our modules, False if it starts with one of
    our modules but the attribute is not there, None if it does not name a module of ours."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        for module_name in modules.get(".".join(parts[:cut]), []):
            obj = importlib.import_module(module_name)
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            return True
        if ".".join(parts[:cut]) in modules:
            return False
    return None


def looks_like_code(name: str) -> bool:
    """A function or class name: snake_case with an underscore, or CamelCase (not a field value
    like `fp16`, nor a config key, which method.md also quotes)."""
    return bool(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)+|[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+", name))


def test_every_code_name_in_method_md_exists() -> None:
    text = METHOD.read_text()
    modules, defined = module_paths(), defined_names()
    # Words the code uses anywhere (config keys, dict keys, field names): a quoted field such as
    # `kpt_tokens` is not a definition but must still be a name the code knows.
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(p.read_text() for p in code_files())))
    missing = []
    for name in sorted(cited_names(text) - EXTERNAL):
        if "." in name:
            if name.rsplit(".", 1)[1] in FILE_SUFFIXES or name in KEYS:
                continue  # a file name or a key, not code
            head, tail = name.split(".")[0], name.rsplit(".", 1)[1]
            if head in defined:  # Class.attribute (a field, a method, a property)
                if tail not in defined:
                    missing.append(name)
                continue
            resolved = resolve(name, modules)
            # Not ours and not another library's: a module of ours that was renamed.
            if resolved is False or (resolved is None and name.split(".")[0] not in EXTERNAL_MODULES):
                missing.append(name)
            continue
        if looks_like_code(name) and name not in defined and name not in words:
            missing.append(name)
    assert not missing, f"docs/method.md cites names the code does not define: {missing}"


def test_the_check_catches_a_moved_name() -> None:
    modules = module_paths()
    assert resolve("schema.Manifest", modules) is False  # the manifest lives in pipeline.cache.manifest
    assert resolve("manifest.Manifest", modules) is True
    assert resolve("torch.save", modules) is None
    assert cited_names("see `lr_factor` and `schema.FIELDS` and `f(x)` and `a b`") == {
        "lr_factor",
        "schema.FIELDS",
        "f",
    }


PREMISE_LABELS = {
    "online-fresh": "(a) online teacher",
    "online-cache-views": "(a') online teacher",
    "none": "(c) no distillation",
}


def _premise_label(configuration: str) -> str:
    if configuration in PREMISE_LABELS:
        return PREMISE_LABELS[configuration]
    return f"(b) cache, V = {configuration.split('-v')[1]} "


def test_results_md_tables_are_their_csv_files() -> None:
    """docs/results.md quotes the premise studies and the scale benchmark from the CSVs those
    write: a rerun that changes a figure fails here until the page is regenerated."""
    import csv

    lines = (ROOT / "docs" / "results.md").read_text().splitlines()
    for study in ("premise-l-tiny", "premise-tiny"):
        start = next(i for i, line in enumerate(lines) if f"({study}.csv)" in line)
        table = [line for line in lines[start:] if line.startswith("| (")]
        for row in csv.DictReader((ROOT / "docs" / f"{study}.csv").open()):
            line = next(t for t in table if t.startswith(f"| {_premise_label(row['configuration'])}"))
            ap = f"{float(row['AP_mean']):.3f} ± {float(row['AP_std']):.3f}"
            assert ap in line and f"| {float(row['train_s_mean']):.0f} |" in line, (study, row, line)
    scale = [line for line in lines if line.startswith(("| local |", "| s3 |"))]
    rows = list(csv.DictReader((ROOT / "docs" / "scale.csv").open()))
    assert len(scale) == len(rows)
    for line, row in zip(scale, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [row["store"], f"{int(row['instances']):,}", row["shards"]]
        assert cells[8] == f"{int(row['objects']):,} ({int(row['plan_objects']):,})"


def _check_replay_figures(text: str, where: str, at_least: int) -> None:
    """Every "K = 8: -1.1 ± 1.2" (also "K = 4 + flip", "K = 16 + tokens on 8", and "K = 8 (256
    instances): ..." for another subset than 128), "none-k8: ..." and "all costs ..." in `text`
    is docs/premise-replay.csv's paired difference (GT boxes, AP points, mean ± std over seeds)."""
    import csv

    text = " ".join(text.split())
    # A figure without a subset is the 128-instance subset's (the 250-epoch regime).
    rows = {(r["instances"], r["trial"]): r for r in csv.DictReader((ROOT / "docs" / "premise-replay.csv").open())}
    suffix = {"": "", " + flip": "-flip", " + tokens on 8": "-t8"}
    quoted = [
        ((n or "128", f"cache-k{k}{suffix[remedy]}"), mean, std)
        for k, remedy, n, mean, std in re.findall(
            r"K = (\d+)( \+ flip| \+ tokens on 8)?(?: \((\d+) instances\))?: ([-+]?\d+\.\d) ± (\d+\.\d)", text
        )
    ]
    quoted += [(("128", t), m, sd) for t, m, sd in re.findall(r"(none-k8): ([-+]?\d+\.\d) ± (\d+\.\d)", text)]
    quoted += [(("128", "none-fresh"), m, sd) for m, sd in re.findall(r"all costs ([-+]?\d+\.\d) ± (\d+\.\d)", text)]
    assert len(quoted) >= at_least, (where, quoted)
    for trial, mean, std in quoted:
        row = rows[trial]
        # The CSV holds 4 decimals, the study printed the unrounded value at 1: half a digit.
        assert abs(float(mean) - 100 * float(row["diff_gt_mean"])) <= 0.051, (where, trial, mean, row)
        assert abs(float(std) - 100 * float(row["diff_gt_std"])) <= 0.051, (where, trial, std, row)


def test_readme_replay_summary_is_the_study_csv() -> None:
    readme = (ROOT / "README.md").read_text()
    bullet = readme[readme.index("**Fixed views wear out") :]
    _check_replay_figures(bullet[: bullet.index("\n- **")], "README", at_least=7)


def test_replay_reading_is_the_study_csv() -> None:
    page = (ROOT / "docs" / "premise-replay.md").read_text()
    reading = page[page.index("## Reading") : page.index("## What was cut")]
    _check_replay_figures(reading, "docs/premise-replay.md", at_least=9)
    with pytest.raises(AssertionError):  # the check fails on a figure that is not the CSV's
        _check_replay_figures(reading.replace("K = 2: -5.7 ± 0.8", "K = 2: -4.7 ± 0.8"), "edited", at_least=9)


def test_readme_speed_table_is_the_benchmark_json() -> None:
    """The README's speed table holds docs/speed.json's ratios, every one of them (no row typed
    by hand, none left out after a new measurement)."""
    import json

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- bench_speed: begin") : readme.index("<!-- bench_speed: end")]
    payload = json.loads((ROOT / "docs" / "speed.json").read_text())
    assert payload["context"]["time"][:10] in block  # the date of the measurement it quotes
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ")][1:]  # no header
    table = {tuple(c.strip() for c in cells[:4]): [c.strip() for c in cells[4:6]] for cells in rows}
    assert table.pop(("paper (FPS ratio as printed)", "", "", "")) == ["4.90x", "1.63x"]
    quoted = {}
    for r in payload["ratios"]:
        key = (r["device"], str(r["threads"] or "-"), r["runtime"], str(r["batch"]))
        quoted[(key, r["student"])] = f"{r['ratio']:.2f}x ({r['ratio_cpu']:.2f}x)"
    assert {key for key, _ in quoted} == set(table)
    for (key, student), cell in quoted.items():
        assert table[key][("distilpose-s", "distilpose-l").index(student)] == cell, (key, student)
