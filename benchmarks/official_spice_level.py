"""At which level of theory, and with which atomrefs, do the official SPICE checkpoints give
energies? And the nablaDFT ones, by the same test.

The authors trained the SPICE rows of Table 3 (models/official/*-SPICE.*) on their own
SPICE dbs, subtracting the per-element references (`atomrefs`) stored in those dbs
(`subtract_atomization_energy` in each config.json); the dbs are not published. Two levels
are candidates:
    wB97X-D/def2-SVP         nablaDFT's level, and the oracle the paper says it uses for
                             SPICE too ("the same DFT-based oracle", App. E)
    wB97M-D3BJ/def2-TZVPPD   SPICE's own labels
and two sets of atomrefs: nablaDFT's (painn.NABLADFT_ATOMREFS, wB97X-D/def2-SVP free atoms)
and SPICE's (data.SPICE_ATOMREFS, wB97M-D3BJ/def2-TZVPPD free atoms).

Ethanol at three geometries (benchmarks/molecules.py: the MMFF one, and two with every atom
moved by 0.05 A N(0, 1), seeds 1 and 2) is computed with Psi4 at both levels. Each model's
output without atomrefs, E_net = E_model - sum_i ref[z_i], is then compared with
    (a) the total energy, E_net + atomrefs vs Psi4 (4 combinations of level and atomrefs);
    (b) relative energies, E(distorted) - E(MMFF), which no atomref enters;
    (c) forces at all three geometries, which no atomref enters either.
(b) and (c) tell the level whatever the atomrefs; (a) then tells the atomrefs.

Result (models/official/README.md): all five SPICE models are at wB97X-D/def2-SVP, with
nablaDFT's atomrefs. Their forces are within 0.8-2.3 kcal/mol/A RMS of wB97X-D/def2-SVP and
6.4-7.0 of wB97M-D3BJ/def2-TZVPPD, their relative energies within 0.06-0.17 and 0.66-0.97
kcal/mol; with nablaDFT's atomrefs their totals are 0.6-1.9 kcal/mol from wB97X-D/def2-SVP,
with SPICE's 164 kcal/mol. (Totals alone do not tell: E - sum(own atomrefs) of the two
levels differ by only 1.0 kcal/mol on ethanol.)

Psi4 1.3.2 computes -D3BJ with Grimme's dftd3 program, which is not installed here. The
wB97M-D3BJ/def2-TZVPPD numbers are therefore Psi4's wB97M-D3BJ functional with its
dispersion switched off (wB97M-V's exchange-correlation, VV10 off, as Psi4 defines
wB97M-D3BJ) plus the D3(BJ) two-body term from tad-dftd3 (a PyPI package, not a dependency
of this project) with Psi4's wB97M-D3BJ parameters (s6 1, s8 0.3908, a1 0.5660, a2 3.1280;
Najibi and Goerigk, JCTC 14, 5725 (2018)). To run that level:
    pip install --target /tmp/d3 tad-dftd3 tad-mctc==0.8.0; PYTHONPATH=/tmp/d3 ...
Every finished single point is appended to --cache and reused by a rerun; Psi4 runs one
job at a time on --threads threads (about 1 min for def2-SVP, several for def2-TZVPPD).

    .venv/bin/python benchmarks/official_spice_level.py [--cache runs/official_spice_level.jsonl]
        [--threads 1]
"""
import argparse
import glob
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import oracles  # noqa: E402
import painn  # noqa: E402
import safe_io  # noqa: E402
from molecules import ETHANOL_GEOMETRIES, ETHANOL_Z  # noqa: E402

KCAL = data.HARTREE_TO_KCAL
SVP = "wB97X-D/def2-SVP"
TZVPPD = "wB97M-D3BJ/def2-TZVPPD"
ATOMREFS = {"nablaDFT": painn.NABLADFT_ATOMREFS, "SPICE": data.SPICE_ATOMREFS}
# Psi4 1.3.2's wB97M-D3BJ (procrouting/dft/hyb_functionals.py) with its -D3BJ part left out:
# nlc False turns VV10 off; a D2 term scaled by s6 = 0 is Psi4's own zero dispersion.
WB97M_WITHOUT_DISPERSION = {
    "name": "wB97M-D3BJ-no-dispersion",
    "xc_functionals": {"HYB_MGGA_XC_WB97M_V": {}},
    "dispersion": {"nlc": False, "type": "d2",
                   "params": {"s6": 0.0, "alpha6": 20.0, "sr6": 1.1}},
}
WB97M_D3BJ = {"s6": 1.0, "s8": 0.3908, "a1": 0.5660, "a2": 3.1280}   # Psi4's, two-body


def d3bj(numbers, positions):
    """D3(BJ) two-body dispersion with wB97M's parameters: (Hartree, forces [n, 3] Ha/A)."""
    import tad_dftd3
    z = torch.as_tensor(numbers)
    x = torch.tensor(np.asarray(positions) / data.BOHR_TO_ANGSTROM, dtype=torch.float64,
                     requires_grad=True)                                  # [n, 3] Bohr
    param = {k: torch.tensor(v, dtype=torch.float64) for k, v in WB97M_D3BJ.items()}
    energy = tad_dftd3.dftd3(z, x, param).sum()
    (gradient,) = torch.autograd.grad(energy, x)                          # Ha/Bohr
    return float(energy.detach()), (-gradient / data.BOHR_TO_ANGSTROM).numpy()


def psi4_single_point(psi4, level, positions):
    """One Psi4 gradient at `level`, Psi4's defaults otherwise (DF, as the oracles run).
    Returns a cache record: energy (Hartree), forces [n, 3] (Hartree/A), seconds."""
    psi4.core.clean_options()
    molecule = oracles.psi4_molecule(psi4, ETHANOL_Z, positions, 0, 1)
    start = time.time()
    if level == SVP:
        gradient, wfn = psi4.gradient("wb97x-d/def2-svp", molecule=molecule, return_wfn=True)
        dispersion, dispersion_forces = 0.0, 0.0
    else:
        psi4.set_options({"basis": "def2-tzvppd"})
        gradient, wfn = psi4.gradient("scf", dft_functional=WB97M_WITHOUT_DISPERSION,
                                      molecule=molecule, return_wfn=True)
        dispersion, dispersion_forces = d3bj(ETHANOL_Z, positions)
    forces = -np.array(gradient) / data.BOHR_TO_ANGSTROM + dispersion_forces
    record = {"energy": float(wfn.energy()) + dispersion, "forces": forces.tolist(),
              "dispersion": dispersion, "seconds": time.time() - start}
    psi4.core.clean()
    psi4.core.clean_variables()
    return record


def model_numbers(model, positions):
    """(E_net Hartree, forces [n, 3] Hartree/A): the model without its atomrefs."""
    z = torch.as_tensor(ETHANOL_Z)
    e, f = model(z, torch.as_tensor(positions, dtype=torch.float64),
                 torch.zeros(len(z), dtype=torch.long), 1)
    own_refs = sum(model.atomrefs[int(a)] for a in ETHANOL_Z)
    return float(e.detach()[0]) - own_refs, f.detach().numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "official_spice_level.jsonl"))
    p.add_argument("--threads", type=int, default=1, help="Psi4 threads")
    p.add_argument("--levels", nargs="+", default=[SVP, TZVPPD])
    args = p.parse_args(argv)

    cache = {}
    if os.path.exists(args.cache):
        cache = {(r["level"], r["geometry"]): r for r in safe_io.read_jsonl(args.cache)}
    todo = [(level, name) for level in args.levels for name in ETHANOL_GEOMETRIES
            if (level, name) not in cache]
    if any(level == TZVPPD for level, _ in todo):
        try:
            import tad_dftd3  # noqa: F401
        except ImportError:
            sys.exit(f"official_spice_level: {TZVPPD} needs tad-dftd3 for its -D3BJ term: "
                     "pip install --target /tmp/d3 tad-dftd3 tad-mctc==0.8.0 and rerun with "
                     "PYTHONPATH=/tmp/d3, or pass --levels " + SVP)
    if todo:
        import psi4
        psi4.core.be_quiet()
        psi4.set_memory("2 GB")
        psi4.core.set_num_threads(args.threads)
        os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
    for level, name in todo:
        print(f"Psi4 {level}, ethanol {name} ...", flush=True)
        record = {"level": level, "geometry": name,
                  **psi4_single_point(psi4, level, ETHANOL_GEOMETRIES[name])}
        print(f"  {record['energy']:.8f} Hartree ({record['seconds']:.0f} s)", flush=True)
        cache[level, name] = record
        safe_io.append_jsonl(args.cache, record)

    names = list(ETHANOL_GEOMETRIES)
    levels = [lv for lv in args.levels if all((lv, n) in cache for n in names)]
    print(f"\nPsi4 1.3.2, ethanol, Hartree (relative energies kcal/mol); "
          f"geometries {names}")
    for level in levels:
        e = [cache[level, n]["energy"] for n in names]
        rel = "  ".join(f"{(x - e[0]) * KCAL:7.2f}" for x in e[1:])
        print(f"  {level:<24} E({names[0]}) {e[0]:.6f}   E - E({names[0]}): {rel}   "
              f"D3BJ part {cache[level, names[0]]['dispersion'] * KCAL:.2f} kcal/mol")
    if len(levels) == 2:
        d = [(cache[levels[1], n]["energy"] - cache[levels[0], n]["energy"]) for n in names]
        refs = {k: sum(v[z] for z in ETHANOL_Z) for k, v in ATOMREFS.items()}
        print(f"  {levels[1]} - {levels[0]}: {d[0] * KCAL:.1f} kcal/mol in E; "
              f"SPICE - nablaDFT atomrefs: {(refs['SPICE'] - refs['nablaDFT']) * KCAL:.1f} "
              f"kcal/mol; so the levels' E - sum(own atomrefs) differ by "
              f"{(d[0] - refs['SPICE'] + refs['nablaDFT']) * KCAL:.1f} kcal/mol")

    short = {SVP: "SVP", TZVPPD: "TZVPPD"}
    print(f"\nEach model against each level (SVP: {SVP}, TZVPPD: {TZVPPD}).\n"
          f"  total: E_net + atomrefs - E_Psi4 at {names[0]}, kcal/mol, for each level and "
          "set of atomrefs;\n  rel: RMS error of E(distorted) - E(mmff), kcal/mol;\n"
          f"  F: force RMSE at {names[0]}, and over all three geometries, kcal/mol/A")
    header = "".join(f" | {short[lv]}+{ar:<8}" for lv in levels for ar in ATOMREFS)
    header += "".join(f" | rel {short[lv]:<6}" for lv in levels)
    header += "".join(f" | F {short[lv]:<6} mmff, all" for lv in levels)
    print(f"{'model':<20} {'set':<9}{header}")
    for path in sorted(glob.glob(os.path.join(ROOT, "models", "official",
                                              "*.NNP_checkpoint_actor"))):
        model = painn.load_checkpoint(path).double().eval()
        out = {n: model_numbers(model, ETHANOL_GEOMETRIES[n]) for n in names}
        row = ""
        for level in levels:
            for refs in ATOMREFS.values():
                total = out[names[0]][0] + sum(refs[z] for z in ETHANOL_Z)
                error = (total - cache[level, names[0]]["energy"]) * KCAL
                row += f" | {error:{len(short[level]) + 9}.2f}"
        for level in levels:
            errors = [(out[n][0] - out[names[0]][0])
                      - (cache[level, n]["energy"] - cache[level, names[0]]["energy"])
                      for n in names[1:]]
            row += f" | {np.sqrt(np.mean(np.square(errors))) * KCAL:10.2f}"
        for level in levels:
            diff = [out[n][1] - np.array(cache[level, n]["forces"]) for n in names]
            row += (f" | {np.sqrt(np.mean(diff[0] ** 2)) * KCAL:12.2f},"
                    f"{np.sqrt(np.mean(np.square(diff))) * KCAL:5.2f}")
        name = os.path.basename(path).split(".")[0]
        print(f"{name:<20} {painn.official_level(path)[0]:<9}{row}")

    print("\nStored references (tests/test_calculator.py), Hartree and Hartree/A:")
    for level in levels:
        for n in names:
            r = cache[level, n]
            print(f"  {level} {n}: energy {r['energy']!r}")
            print("    forces " + repr(np.round(np.array(r["forces"]), 6).tolist()))


if __name__ == "__main__":
    main()
