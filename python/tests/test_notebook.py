"""examples/moedit_tour.ipynb runs top to bottom (every cell, in a fresh kernel of this interpreter)."""
import nbclient
import nbformat

from conftest import ROOT


def test_the_tour_notebook_executes():
    nb = nbformat.read(ROOT / "examples" / "moedit_tour.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "P(English)" in text and "reverted:" in text
