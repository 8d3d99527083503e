"""Import layers, checked on the source (ast, nothing imported): the library never imports the programs built on
it, the network and the losses never import the trainer, and loading a training config imports no jax."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "clsp_jax"
# The demo driver runs the data programs and the tiny config; nothing else in the library may import them.
DEMO = LIBRARY / "demo.py"
PROGRAMS = ("data_prep", "configs", "benchmarks", "tests")
TRAINER = "clsp_jax.train"
BELOW_THE_TRAINER = [LIBRARY / "sharding.py", LIBRARY / "losses.py", *sorted((LIBRARY / "models").rglob("*.py"))]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth (inside functions too). `from a import b`
    gives both "a" and "a.b" (b may be a submodule); relative imports are resolved against the file's package
    (its path relative to `root`)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(paths, forbidden, root: Path = REPO) -> list[str]:
    """"file:line imports module (layer prefix)" for each import of a module under a `forbidden` prefix."""
    out = []
    for path in paths:
        seen = set()
        for line, module in imports(path, root):  # `from a import b` once: as "a" if a is forbidden
            hit = next((p for p in forbidden if _within(module, p)), None)
            if hit and line not in seen:
                seen.add(line)
                out.append(f"{path.relative_to(root)}:{line} imports {module} (layer {hit})")
    return out


def test_the_walk_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "clsp_jax" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    mod = pkg / "mod.py"
    mod.write_text("import data_prep.prepare\nfrom clsp_jax import train\n\ndef f():\n    from .. import configs\n"
                   "    from .sibling import x\n")
    assert imports(mod, tmp_path) == [(1, "data_prep.prepare"), (2, "clsp_jax"), (2, "clsp_jax.train"),
                                      (5, "clsp_jax"), (5, "clsp_jax.configs"), (6, "clsp_jax.sub.sibling"),
                                      (6, "clsp_jax.sub.sibling.x")]
    assert violations([mod], ("data_prep", TRAINER), tmp_path) == [
        "clsp_jax/sub/mod.py:1 imports data_prep.prepare (layer data_prep)",
        "clsp_jax/sub/mod.py:2 imports clsp_jax.train (layer clsp_jax.train)"]


def test_the_library_does_not_import_the_programs_on_top_of_it():
    modules = [p for p in sorted(LIBRARY.rglob("*.py")) if p != DEMO]
    assert len(modules) > 30 and DEMO.is_file()
    found = violations(modules, PROGRAMS)
    assert not found, "the library imports a program (only clsp_jax/demo.py may):\n" + "\n".join(found)


@pytest.mark.parametrize("path", BELOW_THE_TRAINER, ids=lambda p: str(p.relative_to(REPO)))
def test_the_network_losses_and_sharding_do_not_import_the_trainer(path):
    found = violations([path], (TRAINER,))
    assert not found, "\n".join(found)


def test_loading_a_config_imports_no_jax_grain_or_tfds():
    code = ("import configs.tiny, configs.clsp_base, configs.clsp_stage3, configs.defaults; import sys; "
            "heavy = sorted(m for m in sys.modules if m == 'jax' or "
            "m.startswith(('jax.', 'grain', 'tensorflow_datasets', 'flax', 'optax'))); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
