"""Run the teaching notebooks top to bottom in a fresh kernel, as the test suite does.

    python scripts/notebooks.py                        # every notebooks/*.ipynb; fails on the first error
    python scripts/notebooks.py --write                # and store the new outputs in the files (to commit)
    python scripts/notebooks.py notebooks/01_stage1.ipynb

The notebooks read the quick start's models shipped in toys/ (scripts/ship_quickstart.py), never out/, so a fresh
clone and this machine produce the same outputs.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def run_notebook(path, timeout=600):
    """Execute one notebook with the python3 kernel, cwd = the repository root -> (notebook, seconds per code
    cell). Raises nbclient's CellExecutionError (the cell and its traceback) on the first failing cell.
    Progress bars are folded into their last state, as a browser would show them."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    times = []

    class Timed(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, *args, **kw):
            t0 = time.time()
            out = await super().async_execute_cell(cell, cell_index, *args, **kw)
            if cell.cell_type == "code":
                times.append(time.time() - t0)
            return out

    Timed(nb, timeout=timeout, kernel_name="python3", record_timing=False,
          resources={"metadata": {"path": str(ROOT)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = _fold_streams(cell.outputs)
    return nb, times


def _fold_streams(outputs):
    """Merge consecutive stream outputs of one name and keep only what follows the last carriage return of
    each line (tqdm redraws its bar with \r)."""
    merged = []
    for o in outputs:
        if o.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" \
                and merged[-1]["name"] == o["name"]:
            merged[-1]["text"] += o["text"]
        else:
            merged.append(o)
    for o in merged:
        if o.get("output_type") == "stream":
            o["text"] = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in o["text"].split("\n"))
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, default=NOTEBOOKS)
    p.add_argument("--write", action="store_true", help="store the outputs in the notebook files")
    a = p.parse_args(argv)
    import nbformat
    for path in a.paths:
        nb, times = run_notebook(path)
        slow = sorted(range(len(times)), key=lambda i: -times[i])[:3]
        print(f"{path.name}: {sum(times):.0f} s (slowest code cells: "
              + ", ".join(f"#{i + 1} {times[i]:.0f} s" for i in slow) + ")", flush=True)
        if a.write:
            nbformat.write(nb, path)


if __name__ == "__main__":
    sys.exit(main())
