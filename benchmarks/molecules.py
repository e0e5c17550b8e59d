"""The benchmarks' molecules: drug-like SMILES of data/moses_sample.smi (nablaDFT's source)
with a given number of atoms (hydrogens included), one RDKit ETKDG conformer each."""
import os

import numpy as np

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
