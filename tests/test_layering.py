"""The package's layers: the models never import the toy world (``jaxpref.world``: the shapes world, its
dataset builder, the tiny base model's trainer), and generic modules read no method's config section (each method owns its own)."""
import ast
import os
import subprocess
import sys

import train_helpers as th
from jaxpref.methods import METHODS

PACKAGE = os.path.join(th.REPO, "jaxpref")
WORLD = ("jaxpref.world",)


def test_the_models_do_not_import_the_toy_world():
    models = sorted(f"jaxpref.models.{f[:-3]}" for f in os.listdir(os.path.join(PACKAGE, "models"))
                    if f.endswith(".py") and f != "__init__.py")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in models)
            + f"print([m for m in sys.modules if m.startswith({WORLD!r})])")
    out = subprocess.run([sys.executable, "-c", code], cwd=th.REPO, env=th.subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_generic_modules_read_no_method_section():
    sections = {m.config_section for m in METHODS.values() if m.config_section}
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        if os.path.join(PACKAGE, "methods") in root:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if (isinstance(node, ast.Attribute) and node.attr in sections
                        and isinstance(node.value, (ast.Name, ast.Attribute))
                        and getattr(node.value, "id", getattr(node.value, "attr", "")) in ("config", "c", "cfg")):
                    offenders.append(f"{os.path.relpath(path, th.REPO)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
