"""Molecules from a user's files, and conformations back to SDF.

    read = molecule_files.reader("molecules.sdf")           # by the extension
    molecules, problems = read("molecules.sdf")
    m = molecules[0]
    m.heavy_atom_rmsd(m.conformers[0], positions)          # symmetry-aware, Angstrom
    molecule_files.SdfFile("out.sdf").append([molecule_files.sdf_record(
        m.with_positions(positions), "relaxed", {"energy_hartree": -1.5})])

The extension says the format; a file may hold many molecules: SMILES (`SMILES [name]` a
line, `#` a comment), SDF (hydrogens kept; those a record leaves implicit are added with
coordinates), XYZ (ASE, every frame) or an ASE db (data.read_db). Each molecule becomes a
Molecule: its atoms, its conformations (none for SMILES: embed them), its charge and spin
multiplicity and its RDKit graph (the file's, else bonds perceived from the coordinates),
which gives the RDKit molecule at any positions and the symmetry-aware heavy-atom RMSD of
two conformations. An unreadable line or record is a problem (one line naming it), the
others are read; a file that cannot be read at all is a data.DataError. SDF out: a record
of an RDKit molecule with properties, appended whole to a file that a kill mid-write cannot
leave with a partial record. Units: Angstrom.
"""
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
from ase.data import chemical_symbols
from rdkit import Chem, RDLogger
from rdkit.Chem import rdDetermineBonds, rdMolAlign

import data
import make_trajectories
import oracles
import safe_io

SMILES_EXTENSIONS = (".smi", ".smiles", ".txt")


@dataclass
class Molecule:
    index: int                     # record number in the file, from 0
    where: str                     # "file line 3", for messages
    name: str | None
    numbers: np.ndarray            # [n_atoms] atomic numbers
    conformers: list               # [[n_atoms, 3] Angstrom] given, or [] to embed (SMILES)
    charge: int = 0
    multiplicity: int = 1
    smiles: str | None = None      # a SMILES whose atoms (hydrogens added) are these, in order
    mol: Chem.Mol | None = None    # RDKit graph of these atoms in this order, if the file had one

    @property
    def n_atoms(self):
        return len(self.numbers)

    def template(self):
        """The RDKit molecule of these atoms (its bonds perceived from the first conformation
        if the file gave none), without conformers."""
        if self.mol is None:
            self.mol = perceive_bonds(self.numbers, self.conformers[0])
        mol = Chem.Mol(self.mol)
        mol.RemoveAllConformers()
        return mol

    def with_positions(self, positions):
        """The RDKit molecule with one conformer at positions [n_atoms, 3] Angstrom."""
        mol = self.template()
        conformer = Chem.Conformer(mol.GetNumAtoms())
        for i, (x, y, z) in enumerate(np.asarray(positions, dtype=np.float64)):
            conformer.SetAtomPosition(i, (float(x), float(y), float(z)))
        conformer.Set3D(True)
        mol.AddConformer(conformer, assignId=True)
        return mol

    def heavy_atom_rmsd(self, positions_a, positions_b):
        """Heavy-atom RMSD (Angstrom) of two of its conformations after the best alignment
        over symmetry-equivalent atom orders (RDKit GetBestRMS on its graph)."""
        if sum(z > 1 for z in self.numbers) < 2:    # one heavy atom: nothing to tell apart
            return 0.0
        mols = [Chem.RemoveHs(self.with_positions(p), sanitize=False)
                for p in (positions_a, positions_b)]
        return rdMolAlign.GetBestRMS(mols[0], mols[1])


def perceive_bonds(numbers, positions):
    """An RDKit molecule with bonds perceived from the coordinates (neutral: bond orders
    when RDKit finds them, else connectivity only)."""
    xyz = f"{len(numbers)}\n\n" + "".join(
        f"{chemical_symbols[z]} {x:.8f} {y:.8f} {w:.8f}\n" for z, (x, y, w) in
        zip(numbers, np.asarray(positions, dtype=np.float64)))
    RDLogger.DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromXYZBlock(xyz)
        for perceive in (lambda m: rdDetermineBonds.DetermineBonds(m, charge=0),
                         rdDetermineBonds.DetermineConnectivity):
            try:
                candidate = Chem.Mol(mol)
                perceive(candidate)
                return candidate
            except Exception:
                continue
        return mol
    finally:
        RDLogger.EnableLog("rdApp.*")


# ---------------------------------------------------------------------------------------
# Reading: one reader a format, each -> ([Molecule], [problem lines])
# ---------------------------------------------------------------------------------------

def spin_and_charge(numbers, charge, multiplicity, radicals=0):
    """Charge (given, else 0) and multiplicity (given, else from the radical electrons, else
    the lowest for the electron count)."""
    charge = int(charge or 0)
    if multiplicity is None:
        n_electrons = int(np.sum(numbers)) - charge
        multiplicity = radicals + 1 if radicals else 1 + n_electrons % 2
    return charge, int(multiplicity)


def rdkit_input(index, where, name, mol, conformers, smiles=None, given=None):
    """The Molecule of an RDKit molecule (SMILES, SDF): charge and multiplicity as `given`
    (SDF properties), else from its formal charges and radicals."""
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    given = given or {}
    charge, mult = spin_and_charge(numbers, given.get("charge", Chem.GetFormalCharge(mol)),
                                   given.get("multiplicity"),
                                   sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms()))
    return Molecule(index, where, name, numbers, conformers, charge, mult, smiles, mol)


def read_smiles(path):
    molecules, problems = [], []
    for index, (line, smiles, name) in enumerate(make_trajectories.read_smiles_file(path)):
        mol = make_trajectories.parse_smiles(smiles)
        if mol is None:
            problems.append(f"{path} line {line}: RDKit cannot parse SMILES {smiles!r}; fix "
                            "the line")
        else:                           # hydrogens after the heavy atoms (nablaDFT rows)
            molecules.append(rdkit_input(index, f"{path} line {line}", name or smiles,
                                         Chem.AddHs(mol), [], smiles))
    return molecules, problems


def read_sdf(path):
    molecules, problems = [], []
    RDLogger.DisableLog("rdApp.*")        # our line names the record; RDKit's would not
    try:
        supplier = Chem.SDMolSupplier(path, removeHs=False)
        records = [supplier[i] for i in range(len(supplier))]
    except Exception as err:
        raise data.DataError(f"{path}: not a readable SDF file ({oracles.one_line(err)})") from None
    finally:
        RDLogger.EnableLog("rdApp.*")
    for index, mol in enumerate(records):
        where = f"{path} record {index + 1}"
        if mol is None:
            problems.append(f"{where}: RDKit cannot read it (check its atoms, bonds and "
                            "valences)")
            continue
        name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
        if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
            problems.append(f"{where}: no 3D coordinates; give 3D coordinates, or its SMILES")
            continue
        if any(a.GetNumImplicitHs() for a in mol.GetAtoms()):
            mol = Chem.AddHs(mol, addCoords=True)
            print(f"note: {where}: hydrogens the file leaves implicit were added (RDKit)",
                  file=sys.stderr)
        positions = mol.GetConformer().GetPositions()
        mol.RemoveAllConformers()
        given = {k: int(float(mol.GetProp(k))) for k in ("charge", "multiplicity")
                 if mol.HasProp(k)}
        molecules.append(rdkit_input(index, where, name or None, mol, [positions],
                                     given=given))
    return molecules, problems


def read_xyz(path):
    import ase.io
    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:
        raise data.DataError(f"{path}: not a readable XYZ file ({oracles.one_line(err)}); "
                             "expected frames of: atom count, comment, `Symbol x y z` "
                             "lines") from None
    molecules = []
    for index, atoms in enumerate(frames):
        info = atoms.info
        charge, mult = spin_and_charge(atoms.numbers, info.get("charge"),
                                       info.get("multiplicity", info.get("mult")))
        name = info.get("name") if isinstance(info.get("name"), str) else None
        molecules.append(Molecule(index, f"{path} frame {index + 1}", name,
                                  np.asarray(atoms.numbers), [atoms.positions.copy()],
                                  charge, mult))
    return molecules, []


def read_ase_db(path):
    molecules = []
    for index, c in enumerate(data.read_db(path, "total", verbose=False)[0]):
        charge, mult = spin_and_charge(c.numbers, c.info.get("charge"),
                                       c.info.get("multiplicity"))
        mol, smiles = None, None
        if c.smiles:
            if "charge" not in c.info:
                charge, mult = oracles.charge_and_multiplicity(c.numbers, c.smiles)
            try:                              # its graph, if its atoms follow the SMILES
                mol, smiles = oracles.rdkit_molecule(c), c.smiles
            except data.DataError:
                pass
        name = c.info.get("name")
        molecules.append(Molecule(index, f"{path} row {c.id}", name if isinstance(name, str)
                                  else None, c.numbers, [c.positions], charge, mult, smiles, mol))
    return molecules, []


READERS = {**dict.fromkeys(SMILES_EXTENSIONS, read_smiles), ".db": read_ase_db,
           **dict.fromkeys((".sdf", ".mol", ".sd"), read_sdf),
           **dict.fromkeys((".xyz", ".extxyz"), read_xyz)}


def reader(path):
    """The reader of a file, by its extension: read(path) -> ([Molecule], [problem lines])."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: no such input file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise data.DataError(f"{path}: unknown input format {ext or '(no extension)'}; use "
                             f"SMILES ({', '.join(SMILES_EXTENSIONS)}), SDF (.sdf), XYZ (.xyz) "
                             "or an ASE db (.db)")
    return READERS[ext]


# ---------------------------------------------------------------------------------------
# Writing SDF: records with properties, appended whole
# ---------------------------------------------------------------------------------------

def sdf_record(mol, name, properties):
    """An SDF record (through its `$$$$` line) of mol's conformer: name on the title line,
    then the properties {name: value} (floats to the last digit)."""
    mol = Chem.Mol(mol)
    mol.SetProp("_Name", name)
    try:
        block = Chem.MolToMolBlock(mol)
    except Exception:                              # no kekulé form: aromatic bonds
        block = Chem.MolToMolBlock(mol, kekulize=False)
    return (block + "".join(f">  <{k}>\n{repr(v) if isinstance(v, float) else v}\n\n"
                            for k, v in properties.items()) + "$$$$\n")


def sdf_property(record, name):
    """The text of property `name` of an SDF record (None: it has none)."""
    m = re.search(rf">\s*<{name}>[^\n]*\n([^\n]*)\n", record)
    return m.group(1) if m else None


class SdfFile:
    """An SDF file written by whole records: each append is one write, flushed and synced;
    a partial last record that a kill left is cut off when the file is opened (by its one
    writer)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb+") as f:
                text = f.read()
                end = text.rfind(b"$$$$\n") + 5 if b"$$$$\n" in text else 0
                if end < len(text):
                    f.truncate(end)
                    print(f"{path}: cut a partial last record (an interrupted write)",
                          file=sys.stderr)

    def records(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [r + "$$$$\n" for r in f.read().split("$$$$\n")[:-1]]

    def append(self, records):
        if records:
            with open(self.path, "a") as f:
                f.write("".join(records))
                f.flush()
                os.fsync(f.fileno())

    def sort(self, key):
        """Reorder the records by key(record), replacing the file atomically (if the order
        changes)."""
        records = self.records()
        order = sorted(records, key=key)
        if order != records:
            with safe_io.atomic_write(self.path) as tmp, open(tmp, "w") as f:
                f.write("".join(order))
                f.flush()
                os.fsync(f.fileno())
