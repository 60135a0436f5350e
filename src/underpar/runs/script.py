"""A single self-contained `train_gpt.py` generated from the package: the modules a pretrain run
imports (found by following `underpar` imports from tracks/pretrain.py, lazy ones included),
docstrings and comments dropped, served to `import` from inside the file, then the run's
resolved config with the challenge's environment variables on top. The Parameter Golf
challenge counts only this file, so its bytes (optionally as a compressed self-extracting
wrapper, quant/codewrap.py) are the code bytes, and the generated script's own artifact
accounting counts them."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import underpar

ENTRY = "underpar.tracks.pretrain"
# The challenge's environment variables -> config fields (UNDERPAR_SET="a.b=v;c.d=w" sets any field).
ENV_FIELDS = {"RUN_ID": "name", "SEED": "train.seed", "ITERATIONS": "train.max_steps",
              "MAX_WALLCLOCK_SECONDS": "train.max_wallclock_seconds", "VAL_LOSS_EVERY": "train.val_every_steps",
              "DATA_PATH": "data.path", "RUNS_ROOT": "train.runs_root"}

_BOOT = '''
import importlib.abc, importlib.util, json, os, sys
from pathlib import Path
SCRIPT = Path(__file__ if "__file__" in globals() else sys.argv[0]).resolve()
class _Bundle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the bundled modules to import (they shadow an installed underpar)."""
    def _key(self, name):
        base = name.replace(".", "/")
        return next((k for k in (base + "/__init__.py", base + ".py") if k in FILES), None)
    def find_spec(self, name, path=None, target=None):
        key = self._key(name)
        return None if key is None else importlib.util.spec_from_loader(name, self, is_package=key.endswith("__init__.py"))
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        key = self._key(module.__name__)
        module.__file__ = str(SCRIPT.parent / key)
        exec(compile(FILES[key], module.__file__, "exec"), module.__dict__)
sys.meta_path.insert(0, _Bundle())
os.environ.setdefault("UNDERPAR_GIT_COMMIT", COMMIT or "")
def main():
    from underpar import config as cfglib
    from underpar.quant import artifact
    from underpar.runs import store
    from underpar.tracks import pretrain
    # The challenge counts this file: it is the code the artifact's bytes include.
    artifact.code_files = lambda globs=(): [Path(pretrain.__file__).parents[1] / SCRIPT.name]
    artifact.code_bytes = lambda files: SCRIPT.stat().st_size
    artifact.compressed_code = lambda files: ("as shipped", SCRIPT.stat().st_size)
    cfg = cfglib.from_dict(pretrain.PretrainConfig, CONFIG)
    sets = [f"{field}={os.environ[var]}" for var, field in ENV_FIELDS.items() if os.environ.get(var)]
    sets += [s for s in os.environ.get("UNDERPAR_SET", "").split(";") if s.strip()]
    for assignment in sets:
        cfg = cfglib.override(cfg, assignment)
    cfglib.validate(cfg)
    with store.labelled(preset=PRESET):
        pretrain.run(cfg)
if __name__ == "__main__":
    main()
'''


def modules(entry: str = ENTRY) -> dict[str, Path]:
    """Module name -> file of every underpar module `entry` imports, directly or not (imports
    inside functions too), with the packages above them."""
    root = Path(underpar.__file__).parent
    found: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        path = _file(root, name)
        if name in found or path is None:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "underpar"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "underpar":
                    todo += [target] + [f"{target}.{a.name}" for a in node.names]
    return dict(sorted(found.items()))


def _file(root: Path, name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "underpar":
        return None
    path = root.joinpath(*parts[1:])
    return next((p for p in (path / "__init__.py", path.with_suffix(".py")) if p.is_file()), None)


def minify(source: str) -> str:
    """The same code without docstrings and comments (ast round trip): smaller, same behaviour."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def generate(config: dict[str, Any], preset: str | None, commit: str | None, slim: bool = True) -> str:
    """The script's source: the bundled modules, the config, the boot code."""
    root = Path(underpar.__file__).parent.parent
    files = {}
    for path in modules().values():
        text = path.read_text(encoding="utf-8")
        files[str(path.relative_to(root))] = minify(text) if slim else text
    header = (f'"""train_gpt.py generated by underpar from run config {config.get("name")!r} (commit {commit}).\n'
              "Run: torchrun --standalone --nproc_per_node=8 train_gpt.py  (env: RUN_ID, SEED, ITERATIONS,\n"
              "MAX_WALLCLOCK_SECONDS, VAL_LOSS_EVERY, DATA_PATH, RUNS_ROOT; UNDERPAR_SET='a.b=v;c.d=w').\n"
              'Needs torch, numpy, sentencepiece, rich, matplotlib."""\n')
    return (header + "import json\nFILES = {\n" + "".join(f"{k!r}: {v!r},\n" for k, v in files.items()) + "}\n"
            f"CONFIG = json.loads({json.dumps(config)!r})\nPRESET = {preset!r}\nCOMMIT = {commit!r}\n"
            f"ENV_FIELDS = {ENV_FIELDS!r}\n" + _BOOT)


def write(path: str | Path, config: dict[str, Any], preset: str | None, commit: str | None,
          wrapper: str | None = "lzma", slim: bool = True) -> dict[str, Any]:
    """Write the script (as a compressed self-extracting wrapper unless `wrapper` is None);
    its byte counts."""
    source = generate(config, preset, commit, slim)
    blob = source.encode("utf-8")
    if wrapper is not None:
        from underpar.quant import codewrap

        blob = codewrap.wrap(source, wrapper)
    Path(path).write_bytes(blob)
    return {"bytes": len(blob), "source_bytes": len(source.encode("utf-8")), "wrapper": wrapper or "none",
            "modules": len(modules())}
