"""conformations.html: test conformations side by side in 3D, as the paper's Appendix H.

    rows = [conformation_row(conf, final_positions, e0, e_T, rmsd, "NNP-optimized s_T"), ...]
    write_conformations_page("runs/eval_golf/conformations.html", rows, title)

One row per test conformation, three panels: the initial conformation s_0, the
NNP-optimized s_T and the DFT optimum s_opt, each with its DFT energy relative to the
optimum (kcal/mol) and its RMSD to the optimum. s_0 and s_T are rotated onto s_opt (Kabsch,
all atoms), and the three panels of a row turn together. evaluate.py writes the page after
every optimization evaluation (--page_conformations).

The page is one self-contained file: 3Dmol.js 2.5.5 (BSD-3-Clause, third_party/3dmol/) is
inlined, the molecules are embedded as SDF text (bonds and bond orders from the SMILES),
so it opens offline from disk, with no server.
"""
import html
import json
import os

import numpy as np
from rdkit import Chem

import data
import oracles
import safe_io

THREEDMOL_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "third_party", "3dmol", "3Dmol-min.js")
PANEL_SIZE = (300, 260)   # pixels, width x height of one 3D panel


def kabsch_align(positions, reference):
    """positions [n, 3] rotated and translated onto reference [n, 3] (same atom order), the
    rotation that minimizes the all-atom RMSD (Kabsch)."""
    p = positions - positions.mean(axis=0)
    q_center = reference.mean(axis=0)
    u, _, vt = np.linalg.svd(p.T @ (reference - q_center))                  # H = P^T Q
    d = np.sign(np.linalg.det(u @ vt))                                       # no reflection
    rotation = u @ np.diag([1.0, 1.0, d]) @ vt                               # [3, 3]
    return p @ rotation + q_center


def molecule_text(numbers, positions, smiles):
    """(text, format) for 3Dmol: SDF with the SMILES's bonds (without a SMILES, bonds RDKit
    perceives from the coordinates), or XYZ, bonds guessed by 3Dmol from distances, when
    RDKit cannot make the molecule (a SMILES that does not match the atoms)."""
    try:
        conf = data.Conformation(numbers=np.asarray(numbers), positions=positions, smiles=smiles)
        return Chem.MolToMolBlock(oracles.rdkit_molecule(conf)), "sdf"
    except data.DataError:
        symbols = [Chem.GetPeriodicTable().GetElementSymbol(int(z)) for z in numbers]
        lines = [f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(symbols, positions)]
        return f"{len(numbers)}\n{smiles or ''}\n" + "\n".join(lines) + "\n", "xyz"


def conformation_row(conf, final_positions, e0, e_final, rmsd, final_title):
    """One row of the page for a test conformation `conf` (with optimal_positions and
    optimal_energy): e0, e_final are the DFT energies (Hartree, None where the oracle
    failed) of s_0 and of the optimized s_T (titled final_title); rmsd(positions) gives
    the RMSD (A) to the DFT optimum."""
    optimum = np.asarray(conf.optimal_positions, dtype=np.float64)
    panels = []
    for title, positions, energy in (("initial s_0", conf.positions, e0),
                                     (final_title, final_positions, e_final),
                                     ("DFT optimum", optimum, conf.optimal_energy)):
        positions = np.asarray(positions, dtype=np.float64)
        text, fmt = molecule_text(conf.numbers, kabsch_align(positions, optimum), conf.smiles)
        panels.append({"title": title, "model": text, "format": fmt,
                       "energy": energy, "rmsd": float(rmsd(positions))})
    return {"title": f"conformation {conf.id}: {conf.smiles or ''} ({conf.n_atoms} atoms)",
            "e_opt": conf.optimal_energy, "panels": panels}


def caption(panel, e_opt):
    """Text under a panel: DFT energy relative to the optimum, and RMSD."""
    if panel["energy"] is None:
        energy = "E<sub>DFT</sub>: none (the oracle failed here)"
    else:
        de = (panel["energy"] - e_opt) * data.HARTREE_TO_KCAL
        energy = (f"E<sub>DFT</sub> &minus; E<sub>opt</sub> = {de:+.2f} kcal/mol"
                  f"<br>E<sub>DFT</sub> = {panel['energy']:.6f} Ha")
    return (f"<b>{html.escape(panel['title'])}</b><br>{energy}"
            f"<br>RMSD to DFT optimum = {panel['rmsd']:.3f} &Aring;")


PAGE_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; }
.row { margin-bottom: 28px; }
.grid { position: relative; width: %dpx; height: %dpx; outline: 1px solid #ccc; }
.captions { display: grid; grid-template-columns: repeat(3, %dpx); font-size: 13px; }
.captions div { padding: 4px 6px; }
"""

PAGE_SCRIPT = """
ROWS.forEach(function (row, i) {
  // one WebGL context per row (browsers allow only ~16 per page); the 3 panels turn together
  var grid = $3Dmol.createViewerGrid("grid" + i, {rows: 1, cols: 3, control_all: true},
                                     {backgroundColor: "white"});
  row.panels.forEach(function (panel, j) {
    var viewer = grid[0][j];
    viewer.addModel(panel.model, panel.format);
    viewer.setStyle({}, {stick: {radius: 0.14}, sphere: {scale: 0.25}});
    viewer.zoomTo();
    viewer.render();
  });
});
"""


def write_conformations_page(path, rows, title):
    """Write the self-contained page: 3Dmol.js inlined, rows as JSON in the page."""
    with open(THREEDMOL_JS) as f:
        threedmol = f.read()
    width, height = PANEL_SIZE
    body = []
    for i, row in enumerate(rows):
        captions = "".join(f"<div>{caption(p, row['e_opt'])}</div>" for p in row["panels"])
        body.append(f'<div class="row"><h3>{html.escape(row["title"])}</h3>'
                    f'<div class="grid" id="grid{i}"></div>'
                    f'<div class="captions">{captions}</div></div>')
    # "</" never ends the script element early inside the JSON
    rows_json = json.dumps([{"panels": [{"model": p["model"], "format": p["format"]}
                                        for p in row["panels"]]} for row in rows]).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PAGE_STYLE % (3 * width, height, width)}</style>
<script>/* 3Dmol.js 2.5.5, BSD-3-Clause, https://3dmol.org: golf's third_party/3dmol/LICENSE */
{threedmol}</script>
</head><body>
<h2>{html.escape(title)}</h2>
<p>Per test conformation: the initial conformation s_0, the optimized one s_T (by the NNP;
by MMFF for the RDKit row) and the DFT optimum. Energies are DFT (the genuine oracle) relative to the DFT optimum E<sub>opt</sub>;
RMSD is to the DFT optimum, symmetry-aware, on heavy atoms. s_0 and s_T are rotated onto
the optimum; drag a panel to turn the row.</p>
{"".join(body)}
<script>
var ROWS = {rows_json};
{PAGE_SCRIPT}
</script>
</body></html>
"""
    with safe_io.atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(page)
