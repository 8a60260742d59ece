"""Both notebooks run every cell, top to bottom, in a fresh kernel, with CI's values in place of their
"parameters" cell (inserted after it, as papermill does): the embedded tiny model, the session's shapes world,
a few updates. The install cell runs too (jaxpref is importable, so it installs nothing).

The checks are what a reader is promised: the quickstart prints the base and trained rewards and leaves
before_after.png; the SD1.5 LoRA notebook evaluates base vs trained on held-out prompts, draws the grid and
exports the adapters as a diffusers LoRA file. Cost (2 CPU cores): the quickstart loads the default command's
step from the persistent compile cache when test_embedded.py ran first (same xdist group); the LoRA notebook
compiles its own step.
"""
import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# The quickstart's STEPS: configs/tiny.py warms up over 10 updates, and at 10 the step is the default command's.
QUICKSTART_STEPS = 10
LORA_STEPS = 2


def _parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook has exactly one cell tagged 'parameters'"
    return tagged[0]


def run_notebook(path: pathlib.Path, parameters: dict, cwd: pathlib.Path, monkeypatch):
    """Executes every cell of ``path`` with ``parameters`` set after its parameters cell; returns the notebook
    and its printed text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    at = _parameters_cell(nb)
    declared = {t.id for node in ast.parse(nb.cells[at].source).body if isinstance(node, ast.Assign)
                for t in node.targets}
    assert set(parameters) <= declared, f"{path.name}: no parameter {sorted(set(parameters) - declared)}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, injected)
    # The kernel imports this checkout's jaxpref even where the installed one points elsewhere.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    return nb, text


def test_every_notebook_has_a_colab_badge_and_one_repo_url():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        source = path.read_text()
        assert (f"https://colab.research.google.com/github/jaxpref/jaxpref/blob/main/notebooks/{path.name}"
                in source), path.name
        assert source.count('REPO_URL = \\"https://github.com/jaxpref/jaxpref\\"') == 1, path.name
        assert "<your" not in source and "/content/" not in source, path.name


@pytest.mark.slow
def test_quickstart_runs_every_cell(world, tmp_path, monkeypatch):
    _, text = run_notebook(NOTEBOOKS / "quickstart.ipynb", {"STEPS": QUICKSTART_STEPS, "DATA_DIR": world[1]},
                           tmp_path, monkeypatch)
    assert "base mean reward" in text and "trained mean reward" in text
    assert (tmp_path / "workdir_quickstart" / "before_after.png").is_file()


@pytest.mark.slow
def test_sd15_lora_runs_every_cell_on_the_embedded_model(world, tmp_path, monkeypatch):
    parameters = {"MODEL_ID": "embedded:tiny", "DATA_SOURCE": "shapes", "REWARD": "shapes", "STEPS": LORA_STEPS,
                  "EVAL_PROMPTS": 4, "DATA_DIR": world[1]}
    _, text = run_notebook(NOTEBOOKS / "sd15_lora.ipynb", parameters, tmp_path, monkeypatch)
    assert "held-out shapes/mean: base" in text and "win rate" in text
    workdir = tmp_path / "runs" / "dpo_sd15_lora"
    assert (workdir / "before_after_large.png").is_file()
    assert (tmp_path / "dpo_sd15_lora" / "pytorch_lora_weights.safetensors").is_file()
