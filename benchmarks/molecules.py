"""The benchmarks' molecules: drug-like SMILES of data/moses_sample.smi (nablaDFT's source)
with a given number of atoms (hydrogens included), one RDKit ETKDG conformer each; and
ethanol at three fixed geometries (benchmarks/official_spice_level.py computes them with
Psi4, tests/test_calculator.py keeps those numbers)."""
import os

import numpy as np

# Ethanol (C C O H6), RDKit ETKDG (randomSeed=0) + MMFF94, Angstrom
ETHANOL_Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL_POSITIONS = [
    [0.901053, -0.075009, 0.014433], [-0.584386, -0.367845, 0.056173],
    [-1.305777, 0.82213, 0.339827], [1.236692, 0.350698, 0.965765],
    [1.128484, 0.662551, -0.762254], [1.472437, -0.985441, -0.186827],
    [-0.808835, -1.097719, 0.839406], [-0.93224, -0.769922, -0.900185],
    [-1.107426, 1.460558, -0.366337]]
# The same ethanol, and two distortions of it (every atom moved by 0.05 A N(0, 1), seeded)
ETHANOL_GEOMETRIES = {                                                  # name -> [9, 3]
    "mmff": np.array(ETHANOL_POSITIONS),
    "moved1": np.array(ETHANOL_POSITIONS) + np.random.default_rng(1).normal(0, 0.05, (9, 3)),
    "moved2": np.array(ETHANOL_POSITIONS) + np.random.default_rng(2).normal(0, 0.05, (9, 3)),
}
MOSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "moses_sample.smi")


def load_molecules(n_molecules, min_atoms, max_atoms, seed=0, path=MOSES):
    """[(z [n] int64 array, positions [n, 3] float64 array)], the first n_molecules of the
    file with min_atoms..max_atoms atoms that embed."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem
    RDLogger.DisableLog("rdApp.*")
    mols = []
    with open(path) as f:
        for line in f:
            mol = Chem.MolFromSmiles(line.split()[0]) if line.strip() else None
            if mol is None:
                continue
            mol = Chem.AddHs(mol)
            if not min_atoms <= mol.GetNumAtoms() <= max_atoms:
                continue
            params = AllChem.ETKDGv3()
            params.randomSeed = seed
            if AllChem.EmbedMolecule(mol, params) != 0:
                continue
            z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
            mols.append((z, mol.GetConformer().GetPositions()))
            if len(mols) == n_molecules:
                return mols
    raise SystemExit(f"only {len(mols)} molecules of {min_atoms}-{max_atoms} atoms in {path}")
