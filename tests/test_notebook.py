"""The quickstart notebook's CPU part runs top to bottom (accelerator and install cells left out)."""
import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_cpu_part_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if not {"accelerator", "install"} & set(c.metadata.get("tags", []))]
    monkeypatch.setenv("JAXPREF_NOTEBOOK_STEPS", "4")
    # The kernel imports this checkout's jaxpref even where the installed one points elsewhere.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trained mean reward" in outputs
    assert (tmp_path / "workdir_quickstart" / "before_after.png").is_file()
