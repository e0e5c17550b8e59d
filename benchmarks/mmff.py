"""Speed of the surrogate oracle: MMFF94 energy of a nablaDFT-size molecule at new positions.

The paper's figure is about 120 microseconds per call on one core. Here: molecules of
30-40 atoms (hydrogens included) from data/moses_sample.smi, one ETKDG conformation each,
the force field built once per molecule (oracles.MMFFSurrogate), then `--calls` energies
at positions jittered by 0.05 A (made beforehand, so only the energy call is timed).

    python benchmarks/mmff.py [--molecules 20] [--calls 2000]
"""
import argparse
import os
import sys
import time

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import oracles  # noqa: E402
from data import Conformation  # noqa: E402


def nabladft_size_conformations(path, n_molecules, seed=0):
    """ETKDG conformations of the first SMILES of `path` with 30-40 atoms."""
    confs = []
    for line in open(path):
        mol = Chem.AddHs(Chem.MolFromSmiles(line.split()[0]))
        if not 30 <= mol.GetNumAtoms() <= 40 or AllChem.EmbedMolecule(mol, randomSeed=seed):
            continue
        confs.append(Conformation(np.array([a.GetAtomicNum() for a in mol.GetAtoms()]),
                                  mol.GetConformer().GetPositions(), smiles=line.split()[0]))
        if len(confs) == n_molecules:
            break
    return confs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smiles", default=os.path.join(ROOT, "data", "moses_sample.smi"))
    parser.add_argument("--molecules", type=int, default=20)
    parser.add_argument("--calls", type=int, default=2000, help="energy calls per molecule")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    confs = nabladft_size_conformations(args.smiles, args.molecules)
    build, per_call = [], []
    for conf in confs:
        start = time.perf_counter()
        surrogate = oracles.MMFFSurrogate(conf)
        build.append(time.perf_counter() - start)
        moved = conf.positions + rng.normal(scale=0.05, size=(args.calls, *conf.positions.shape))
        start = time.perf_counter()
        for positions in moved:                      # [n_atoms, 3] Angstrom each
            surrogate.energy(positions)
        per_call.append((time.perf_counter() - start) / args.calls)
    n_atoms = np.mean([c.n_atoms for c in confs])
    print(f"{len(confs)} molecules, {n_atoms:.1f} atoms on average, {args.calls} calls each")
    print(f"MMFF94 energy at new positions: {1e6 * np.mean(per_call):.1f} us per call "
          f"(min {1e6 * np.min(per_call):.1f}, max {1e6 * np.max(per_call):.1f}; "
          "the paper: ~120 us)")
    print(f"force field construction, once per molecule: {1e3 * np.mean(build):.2f} ms")


if __name__ == "__main__":
    main()
