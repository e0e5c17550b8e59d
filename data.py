"""Datasets of conformations: ASE SQLite databases in the nablaDFT / official GOLF schema.

A row of such a db:
    row.toatoms()                 atomic numbers and positions (Angstrom)
    row.smiles                    SMILES of the molecule (key-value pair)
    row.data['energy']            total energy, Hartree (scalar or length-1 array)
    row.data['forces']            [n_atoms, 3], Hartree/Angstrom
    row.data['optimal_energy']    optional: energy of the DFT-optimized conformation (Eq. 4)
    row.data['optimal_positions'] optional: [n_atoms, 3] Angstrom, that conformation (COV/MAT)
Metadata: atomrefs {'energy': [one value per atomic number, Hartree]}, _distance_unit 'Ang',
_property_unit_dict {'energy': 'Hartree', 'forces': 'Hartree/Ang'}.

nablaDFT v2 energy databases store formation energies (E minus the sum of atomrefs), the
official GOLF D-0 / D-test store total energies; `read_db` always returns total energies.
Our writers store total energies.

Also here: batching of molecules of different sizes (flat atoms + molecule index), labelled
conformations kept as device tensors for training (ConformationTensors), a training sampler, the split into train/validation molecules, and the GOLF replay buffer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

import safe_io
from safe_io import DataError   # noqa: F401  (data.DataError: bad input, one line)

HARTREE_TO_KCAL = 627.509474          # kcal/mol per Hartree
BOHR_TO_ANGSTROM = 0.529177210903     # Angstrom per Bohr
MAX_Z = 100                           # elements the model embeds (painn.MAX_Z)
ENERGY_KINDS = ("auto", "total", "formation")


@dataclass
class Conformation:
    numbers: np.ndarray                      # [n_atoms] atomic numbers
    positions: np.ndarray                    # [n_atoms, 3] Angstrom
    energy: float | None = None              # total energy, Hartree
    forces: np.ndarray | None = None         # [n_atoms, 3] Hartree/Angstrom
    smiles: str | None = None
    id: int | None = None                    # row id in the db it was read from
    optimal_energy: float | None = None      # Hartree
    optimal_positions: np.ndarray | None = None  # [n_atoms, 3] Angstrom
    info: dict = field(default_factory=dict)  # other key-value pairs of the row

    @property
    def n_atoms(self):
        return len(self.numbers)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------

def _scalar(value):
    return None if value is None else float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def read_atomrefs(metadata):
    """{z: E_ref} from db metadata `atomrefs: {'energy': [...]}` (Hartree), or None."""
    refs = (metadata or {}).get("atomrefs")
    if not refs or "energy" not in refs:
        return None
    values = np.asarray(refs["energy"], dtype=np.float64).reshape(-1)
    return {z: float(e) for z, e in enumerate(values) if e != 0.0}


def decide_energy_kind(confs, atomrefs, path):
    """'total' or 'formation', by magnitude: a total energy is about -0.5 Hartree per
    hydrogen and tens per heavy atom, a formation energy a few tenths of a Hartree per atom."""
    with_energy = [c for c in confs if c.energy is not None]
    if not with_energy:
        return "total"
    per_atom = np.median([abs(c.energy) / c.n_atoms for c in with_energy])
    if atomrefs:
        ref_per_atom = np.median([abs(sum(atomrefs.get(int(z), 0.0) for z in c.numbers))
                                  / c.n_atoms for c in with_energy])
        return "total" if per_atom > 0.5 * ref_per_atom else "formation"
    return "total" if per_atom > 1.0 else "formation"


def read_db(path, energy_kind="auto", require_energy=False, require_forces=False,
            verbose=True):
    """Read every row of an ASE db into Conformations with total energies (Hartree).

    Returns (conformations, atomrefs or None). Raises DataError with one clear line on bad
    input: missing file, empty db, NaN coordinates, unknown element, missing labels."""
    import ase.db
    if energy_kind not in ENERGY_KINDS:
        raise DataError(f"--energy_kind must be one of {ENERGY_KINDS}, not {energy_kind!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such database file")
    try:
        db = ase.db.connect(path, type="db")
        metadata = db.metadata
        rows = list(db.select())
    except Exception as err:  # sqlite3.DatabaseError, KeyError of a foreign schema, ...
        raise DataError(f"{path}: not a readable ASE database ({err})") from None
    if not rows:
        raise DataError(f"{path}: the database has no rows")
    atomrefs = read_atomrefs(metadata)

    confs = []
    for row in rows:
        where = f"{path}, row {row.id}"
        numbers = np.asarray(row.numbers, dtype=np.int64)
        positions = np.asarray(row.positions, dtype=np.float64)
        if numbers.min() < 1 or numbers.max() >= MAX_Z:
            raise DataError(f"{where}: atomic number {numbers.max()} is outside 1..{MAX_Z - 1}, "
                            "which the model cannot embed")
        if not np.isfinite(positions).all():
            raise DataError(f"{where}: positions contain NaN or inf; fix or remove the row")
        data = row.get("data") or {}
        energy = _scalar(data.get("energy"))
        forces = data.get("forces")
        if forces is not None:
            forces = np.asarray(forces, dtype=np.float64).reshape(-1, 3)
            if forces.shape[0] != len(numbers):
                raise DataError(f"{where}: forces have {forces.shape[0]} rows for "
                                f"{len(numbers)} atoms")
        if require_energy and energy is None:
            raise DataError(f"{where}: no energy in row.data; label the db first "
                            "(make_trajectories.py --mode single_point)")
        if require_forces and forces is None:
            raise DataError(f"{where}: no forces in row.data; training needs energies and "
                            "forces (make_trajectories.py --mode single_point labels them)")
        for name, value in (("energy", energy), ("forces", forces)):
            if value is not None and not np.isfinite(value).all():
                raise DataError(f"{where}: {name} is NaN or inf; fix or remove the row")
        opt_pos = data.get("optimal_positions")
        kvp = dict(row.key_value_pairs)
        confs.append(Conformation(
            numbers=numbers, positions=positions, energy=energy, forces=forces,
            smiles=kvp.pop("smiles", None), id=row.id,
            optimal_energy=_scalar(data.get("optimal_energy")),
            optimal_positions=None if opt_pos is None
            else np.asarray(opt_pos, dtype=np.float64).reshape(-1, 3),
            info=kvp))

    kind = energy_kind
    if kind == "auto":
        kind = decide_energy_kind(confs, atomrefs, path)
        if verbose and any(c.energy is not None for c in confs):
            print(f"{path}: energies read as {kind} energies (--energy_kind auto)")
    if kind == "formation":
        if not atomrefs:
            raise DataError(f"{path}: formation energies but no atomrefs in the metadata; "
                            "pass --energy_kind total if they are total energies")
        for c in confs:
            shift = sum(atomrefs.get(int(z), 0.0) for z in c.numbers)
            if c.energy is not None:
                c.energy += shift
            if c.optimal_energy is not None:
                c.optimal_energy += shift
    return confs, atomrefs


# ---------------------------------------------------------------------------------------
# Writing (total energies, nablaDFT metadata)
# ---------------------------------------------------------------------------------------

def atomrefs_list(atomrefs):
    """{z: E} -> the metadata layout, one value per atomic number 0..MAX_Z-1."""
    refs = np.zeros(MAX_Z)
    for z, e in atomrefs.items():
        refs[int(z)] = e
    return refs.tolist()


def connect_for_writing(path, atomrefs=None, **metadata):
    """Open (or create) an ASE db for appending; a new db gets the nablaDFT metadata.

    Every `write_conformation` is its own SQLite transaction: a kill loses nothing written."""
    import ase.db
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db = ase.db.connect(path, type="db", append=True)
    if not db.metadata:
        meta = {"_distance_unit": "Ang",
                "_property_unit_dict": {"energy": "Hartree", "forces": "Hartree/Ang"},
                **metadata}
        if atomrefs:
            meta["atomrefs"] = {"energy": atomrefs_list(atomrefs)}
        db.metadata = meta
    return db


def write_conformation(db, conf, **key_value_pairs):
    """Append one conformation; returns the new row id. Extra key-value pairs (ints, floats,
    strings) are stored as row keys, e.g. conf_id for resuming."""
    from ase import Atoms
    data = {}
    if conf.energy is not None:
        data["energy"] = np.array([conf.energy], dtype=np.float64)
    if conf.forces is not None:
        data["forces"] = np.asarray(conf.forces, dtype=np.float64)
    if conf.optimal_energy is not None:
        data["optimal_energy"] = np.array([conf.optimal_energy], dtype=np.float64)
    if conf.optimal_positions is not None:
        data["optimal_positions"] = np.asarray(conf.optimal_positions, dtype=np.float64)
    kvp = dict(key_value_pairs)
    if conf.smiles:
        kvp["smiles"] = conf.smiles
    return db.write(Atoms(numbers=conf.numbers, positions=conf.positions), data=data, **kvp)


def rewrite_sorted(path, sort_key):
    """Rewrite an ASE db with its rows in the order of sort_key(row), atomically (a new db
    beside it replaces it: safe_io.atomic_write): the same rows give the same db whatever
    order they were written in. Atoms, key-value pairs, data and metadata are copied; ASE's
    own ctime and user columns get the rewrite's. Nothing is done if the rows are already
    in order with ids 1..n. Returns True if the db was rewritten."""
    import ase.db
    db = ase.db.connect(path, type="db")
    rows = list(db.select())
    ordered = sorted(rows, key=sort_key)                   # sorted() is stable
    if [row.id for row in ordered] == list(range(1, len(rows) + 1)):
        return False
    with safe_io.atomic_write(path) as tmp:
        new = ase.db.connect(tmp, type="db", append=False)
        new.metadata = db.metadata
        with new:                                          # one transaction
            for row in ordered:
                new.write(row.toatoms(), key_value_pairs=dict(row.key_value_pairs),
                          data=dict(row.get("data") or {}))
    return True


# ---------------------------------------------------------------------------------------
# Batching: molecules of different sizes as flat atoms + molecule index
# ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    z: "torch.Tensor"          # [n_atoms] long
    positions: "torch.Tensor"  # [n_atoms, 3]
    batch: "torch.Tensor"      # [n_atoms] molecule index, contiguous
    n_molecules: int
    energy: "torch.Tensor | None" = None   # [n_molecules] float64, Hartree
    forces: "torch.Tensor | None" = None   # [n_atoms, 3], Hartree/Angstrom


def collate(confs, device="cpu", dtype=None):
    """Concatenate conformations into one Batch (labels included when all have them)."""
    import torch   # here, not at the top: the Psi4 worker processes import data.py
    dtype = dtype or torch.float32
    z = torch.as_tensor(np.concatenate([c.numbers for c in confs]), device=device)
    positions = torch.as_tensor(np.concatenate([c.positions for c in confs]),
                                dtype=dtype, device=device)
    counts = torch.as_tensor([c.n_atoms for c in confs], device=device)
    batch = torch.repeat_interleave(torch.arange(len(confs), device=device), counts)
    energy = forces = None
    if all(c.energy is not None for c in confs):
        energy = torch.tensor([c.energy for c in confs], dtype=torch.float64, device=device)
    if all(c.forces is not None for c in confs):
        forces = torch.as_tensor(np.concatenate([c.forces for c in confs]),
                                 dtype=dtype, device=device)
    return Batch(z, positions, batch, len(confs), energy, forces)


class ConformationTensors:
    """Labelled conformations as flat tensors on one device, so that a minibatch is a
    gather by index: no Python objects and one small host-to-device copy per step.

        numbers   [n_atoms_total] long       atoms of all conformations, concatenated
        positions [n_atoms_total, 3] dtype   Angstrom
        forces    [n_atoms_total, 3] dtype   Hartree/Angstrom
        energy    [n_confs] float64          Hartree
        n_atoms, first_atom [n_confs]        host (numpy) copies: the layout of a gather is
                                             computed on the host, with no device sync

    gather(indices) returns the same Batch as collate([confs[i] for i in indices]);
    extend(confs) appends (storage grows by doubling, as the replay buffer grows)."""

    def __init__(self, confs=(), device="cpu", dtype=None):
        import torch
        self.device, self.dtype = torch.device(device), dtype or torch.float32
        self.n_confs = self.n_atoms_total = 0
        self.n_atoms = np.zeros(0, dtype=np.int64)
        self.first_atom = np.zeros(0, dtype=np.int64)
        self._numbers = torch.zeros(0, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(0, 3, dtype=self.dtype, device=self.device)
        self._forces = torch.zeros(0, 3, dtype=self.dtype, device=self.device)
        self._energy = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.extend(confs)

    def __len__(self):
        return self.n_confs

    def extend(self, confs):
        import torch
        confs = list(confs)
        if not confs:
            return
        for c in confs:
            if c.energy is None or c.forces is None:
                raise ValueError("ConformationTensors holds labelled conformations only")
        counts = np.array([c.n_atoms for c in confs], dtype=np.int64)
        n0, a0 = self.n_confs, self.n_atoms_total
        n1, a1 = n0 + len(confs), a0 + int(counts.sum())
        if n1 > len(self._energy):                       # grow by doubling
            self._energy = _grown(self._energy, max(n1, 2 * len(self._energy)))
            self.n_atoms = np.resize(self.n_atoms, len(self._energy))
            self.first_atom = np.resize(self.first_atom, len(self._energy))
        if a1 > len(self._numbers):
            size = max(a1, 2 * len(self._numbers))
            self._numbers, self._positions, self._forces = (
                _grown(t, size) for t in (self._numbers, self._positions, self._forces))
        put = dict(device=self.device)
        self._numbers[a0:a1] = torch.as_tensor(np.concatenate([c.numbers for c in confs]), **put)
        self._positions[a0:a1] = torch.as_tensor(np.concatenate([c.positions for c in confs]),
                                                 dtype=self.dtype, **put)
        self._forces[a0:a1] = torch.as_tensor(np.concatenate([c.forces for c in confs]),
                                              dtype=self.dtype, **put)
        self._energy[n0:n1] = torch.tensor([c.energy for c in confs], dtype=torch.float64, **put)
        self.n_atoms[n0:n1] = counts
        self.first_atom[n0:n1] = a0 + np.cumsum(counts) - counts
        self.n_confs, self.n_atoms_total = n1, a1

    def gather(self, indices):
        """The Batch of conformations `indices` (in that order)."""
        import torch
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        counts = self.n_atoms[idx]                                        # [B] host
        mol = np.repeat(np.arange(len(idx)), counts)                      # [n] molecule in batch
        start = np.cumsum(counts) - counts
        atom = self.first_atom[idx][mol] + np.arange(len(mol)) - start[mol]  # [n] stored atom
        host = torch.from_numpy(np.concatenate([atom, mol, idx]))
        atom, mol, idx = host.to(self.device, non_blocking=True).split(
            [len(atom), len(mol), len(idx)])
        return Batch(self._numbers.index_select(0, atom), self._positions.index_select(0, atom),
                     mol, len(idx), self._energy.index_select(0, idx),
                     self._forces.index_select(0, atom))


def _grown(t, size):
    """t with its first dimension enlarged to `size` (new rows zero)."""
    new = t.new_zeros(size, *t.shape[1:])
    new[:len(t)] = t
    return new


# ---------------------------------------------------------------------------------------
# Training data: reference energies, molecule split, minibatches, replay buffer
# ---------------------------------------------------------------------------------------

def fit_atomrefs(confs):
    """Per-element reference energies by least squares: E_k ~ sum_z count_k(z) ref(z).
    Used when a db has no atomrefs; the network then learns the small remainder."""
    elements = sorted({int(z) for c in confs for z in c.numbers})
    counts = np.array([[np.sum(c.numbers == z) for z in elements] for c in confs], float)
    energies = np.array([c.energy for c in confs])
    refs, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(e) for z, e in zip(elements, refs)}


def molecule_key(conf):
    """Conformations of one molecule share this key: the SMILES, else the formula."""
    if conf.smiles:
        return conf.smiles
    z, n = np.unique(conf.numbers, return_counts=True)
    return "formula:" + ",".join(f"{a}x{b}" for a, b in zip(z, n))


def split_by_molecule(confs, val_fraction, seed=0):
    """Hold out whole molecules (not conformations) for validation."""
    keys = sorted({molecule_key(c) for c in confs})
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    n_val = int(round(val_fraction * len(keys)))
    if val_fraction > 0 and len(keys) > 1:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val_keys = set(keys[:n_val])
    train = [c for c in confs if molecule_key(c) not in val_keys]
    val = [c for c in confs if molecule_key(c) in val_keys]
    return train, val


class Minibatches:
    """Endless minibatches of a dataset, reshuffled every epoch (sampling without
    replacement). State (rng, order, position) lives in the object and can be saved."""

    def __init__(self, n_items, batch_size, rng):
        self.n_items, self.batch_size, self.rng = n_items, batch_size, rng
        self.order, self.pos = rng.permutation(n_items), 0

    def next_indices(self):
        out = []
        while len(out) < self.batch_size:
            if self.pos == self.n_items:
                self.order, self.pos = self.rng.permutation(self.n_items), 0
            take = min(self.batch_size - len(out), self.n_items - self.pos)
            out.extend(self.order[self.pos:self.pos + take].tolist())
            self.pos += take
        return out


class ReplayBuffer:
    """GOLF's training data (Algorithm 1): the initial dataset D0 plus the conformations the
    genuine oracle labelled during training. A minibatch draws a share `initial_conf_pct`
    of its samples from D0 and the rest from the collected ones (all from D0 while nothing
    is collected yet)."""

    def __init__(self, initial, initial_conf_pct, rng):
        self.initial, self.collected = list(initial), []
        self.initial_conf_pct, self.rng = initial_conf_pct, rng
        self.tensors = None          # ConformationTensors of initial + collected, see sample_batch

    def add(self, conf):
        self.collected.append(conf)
        if self.tensors is not None:
            self.tensors.extend([conf])

    def n_from_initial(self, batch_size):
        if not self.collected:
            return batch_size
        return int(round(self.initial_conf_pct * batch_size))

    def sample_indices(self, batch_size):
        """Indices into initial + collected: a share from D0 first, then collected ones."""
        n0 = self.n_from_initial(batch_size)
        idx0 = self.rng.integers(len(self.initial), size=n0)
        idx1 = self.rng.integers(len(self.collected), size=batch_size - n0) if n0 < batch_size \
            else np.zeros(0, dtype=np.int64)
        return np.concatenate([idx0, len(self.initial) + idx1])

    def sample(self, batch_size):
        n = len(self.initial)
        return [self.initial[i] if i < n else self.collected[i - n]
                for i in self.sample_indices(batch_size)]

    def sample_batch(self, batch_size, device="cpu", dtype=None):
        """The Batch of `sample` (the same draws), gathered from tensors kept on `device`."""
        if self.tensors is None:
            self.tensors = ConformationTensors(self.initial + self.collected, device, dtype)
        return self.tensors.gather(self.sample_indices(batch_size))


# ---------------------------------------------------------------------------------------
# SPICE (Eastman et al., Sci. Data 10, 11 (2023)): the paper's D0^SPICE and D_test^SPICE
# (Sec. 6.3, App. E, Table 3) from the public HDF5 release (SPICE-*.hdf5)
# ---------------------------------------------------------------------------------------
# The release has one group per molecule with `subset`, `smiles` (explicit hydrogens, atom
# map numbers), `atomic_numbers` [n] (atom k has map number k + 1), `conformations`
# [M, n, 3] Bohr, `dft_total_energy` [M] Hartree and `dft_total_gradient` [M, n, 3]
# Hartree/Bohr (openmm/spice-dataset, downloader/README.md).
#
# High- and low-energy conformations: the file has no flag for them; its order marks them.
# For every PubChem molecule SPICE first sampled 25 conformations from molecular dynamics at
# 500 K (high energy), then made one nearby lower-energy conformation from each, in the
# same order, by a few minimization steps and 1 ps at 100 K, appended after them
# (openmm/spice-dataset, pubchem/createPubchem.py, "Create a nearby, lower energy
# conformation from each one"; README.md: "both low and high energy conformations").
# submission/submit.py names conformation i of a molecule "<molecule>-<i>" in that order,
# so conformations 0-24 are the high-energy ones, 25-49 the low-energy ones. The release
# drops conformations with very large forces (downloader.py, max_force), so a molecule with
# fewer than 50 may have its split shifted; spice_splits reports how often the first 25
# have the higher mean energy, which checks this order on the real file.

SPICE_METHOD = "wB97M-D3BJ/def2-TZVPPD"     # SPICE's level; nablaDFT's is wB97X-D/def2-SVP
SPICE_N_HIGH = 25                            # conformations 0..24 of a molecule: 500 K MD
SPICE_DROP_ELEMENTS = (15, 53)               # P and I (App. E; nablaDFT has neither)
# The free neutral atoms at SPICE's level (Psi4 1.5, UHF, lowest of multiplicities 1-4),
# Hartree, as SPICE's downloader/downloader.py lists them: the per-element references of
# our metadata (nablaDFT's atomrefs are the same kind of numbers at its own level).
SPICE_ATOMREFS = {1: -0.4987605100487531, 6: -37.87264507233593, 7: -54.62327513368922,
                  8: -75.11317840410095, 9: -99.78611622985483, 15: -341.3059197024934,
                  16: -398.1599636677874, 17: -460.1988762285739, 35: -2574.1167240829964,
                  53: -297.76228914445625}


@dataclass
class SpiceMolecule:
    name: str               # the HDF5 group
    subset: str
    smiles: str             # ours: heavy atoms in SMILES order, hydrogens added after them
    numbers: np.ndarray     # [n_atoms] in our order
    order: np.ndarray       # [n_atoms]: our atom i is the file's atom order[i]


def spice_atom_order(mapped_smiles, numbers):
    """SPICE's mapped explicit-hydrogen SMILES -> (our SMILES, order), where `order[i]` is the
    file's index of our atom i: heavy atoms in the order of our SMILES, then each one's
    hydrogens (oracles.rdkit_molecule's layout). None if RDKit cannot read it, or the
    topology of the result is not the file's (checked bond by bond)."""
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    try:
        params = Chem.SmilesParserParams()
        params.removeHs = False
        mol = Chem.MolFromSmiles(mapped_smiles, params)
        if mol is None:
            return None
        file_index = [atom.GetAtomMapNum() - 1 for atom in mol.GetAtoms()]
        bare = Chem.Mol(mol)
        for atom in bare.GetAtoms():
            atom.SetAtomMapNum(0)
        heavy = [a.GetIdx() for a in bare.GetAtoms() if a.GetAtomicNum() != 1]
        skeleton = Chem.RemoveHs(bare)           # keeps the heavy atoms in their order
        if skeleton.GetNumAtoms() != len(heavy):
            return None
        smiles = Chem.MolToSmiles(skeleton)
        written = [int(i) for i in skeleton.GetProp("_smilesAtomOutputOrder")[1:-1].split(",")
                   if i.strip()]
        ours = [heavy[j] for j in written]                           # mol indices
        ours += [h.GetIdx() for j in written for h in sorted(
            mol.GetAtomWithIdx(heavy[j]).GetNeighbors(), key=lambda a: a.GetIdx())
            if h.GetAtomicNum() == 1]
        order = np.array([file_index[i] for i in ours])
        check = Chem.AddHs(Chem.MolFromSmiles(smiles))
    finally:
        RDLogger.EnableLog("rdApp.*")
    numbers = np.asarray(numbers)
    if (len(order) != len(numbers) or sorted(order) != list(range(len(numbers)))
            or [a.GetAtomicNum() for a in check.GetAtoms()] != numbers[order].tolist()):
        return None
    file_bonds = {frozenset((file_index[b.GetBeginAtomIdx()], file_index[b.GetEndAtomIdx()]))
                  for b in mol.GetBonds()}
    our_bonds = {frozenset((int(order[b.GetBeginAtomIdx()]), int(order[b.GetEndAtomIdx()])))
                 for b in check.GetBonds()}
    return (smiles, order) if our_bonds == file_bonds else None


def read_spice(path, subset="pubchem"):
    """The molecules of a SPICE HDF5 file whose subset name contains `subset` (any case;
    None: all), without conformations: [SpiceMolecule], and {reason: count} of those left
    out. Raises DataError with one line for a file that is not in SPICE's layout."""
    import h5py
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such SPICE HDF5 file")
    molecules, skipped = [], {}
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not an HDF5 file ({err})") from None
    with f:
        for name in sorted(f):
            group = f[name]
            missing = [k for k in ("smiles", "atomic_numbers", "conformations",
                                   "dft_total_energy", "dft_total_gradient") if k not in group]
            if missing:
                raise DataError(f"{path}, group {name!r}: no {', '.join(missing)}; expected "
                                "SPICE's layout, downloaded with dft_total_energy and "
                                "dft_total_gradient")
            if subset and "subset" not in group:
                raise DataError(f"{path}, group {name!r}: no subset to select "
                                f"{subset!r} by; pass --spice_subset '' to keep every group")
            group_subset = group["subset"].asstr()[0] if "subset" in group else ""
            if subset and subset.lower() not in group_subset.lower():
                skipped["other subset"] = skipped.get("other subset", 0) + 1
                continue
            numbers = np.asarray(group["atomic_numbers"], dtype=np.int64)
            layout = spice_atom_order(group["smiles"].asstr()[0], numbers)
            if layout is None:
                skipped["SMILES RDKit cannot map"] = skipped.get("SMILES RDKit cannot map", 0) + 1
                continue
            molecules.append(SpiceMolecule(name, group_subset, layout[0], numbers[layout[1]],
                                           layout[1]))
    return molecules, skipped


def read_spice_conformations(f, molecule):
    """[Conformation] of one molecule from the open HDF5 file `f`, in our units and atom
    order; info: spice_index (its index in the group) and energy_level (high | low)."""
    group = f[molecule.name]
    positions = np.asarray(group["conformations"], dtype=np.float64)[:, molecule.order]
    gradient = np.asarray(group["dft_total_gradient"], dtype=np.float64)[:, molecule.order]
    energy = np.asarray(group["dft_total_energy"], dtype=np.float64).reshape(-1)
    return [Conformation(molecule.numbers, positions[i] * BOHR_TO_ANGSTROM,       # Angstrom
                         energy=float(energy[i]),                                  # Hartree
                         forces=-gradient[i] / BOHR_TO_ANGSTROM,                   # Hartree/A
                         smiles=molecule.smiles,
                         # "spice:" + group: ASE refuses strings that read as numbers
                         info={"name": f"spice:{molecule.name}", "spice_index": i,
                               "energy_level": "high" if i < SPICE_N_HIGH else "low"})
            for i in range(len(energy))]


def spice_splits(molecules, n_train, n_test, seed=0):
    """App. E: molecules with P or I out; the rest shuffled (seeded) into n_train molecules
    for D0^SPICE and the next n_test for D_test^SPICE. Returns (train, test, n_dropped)."""
    kept = [m for m in molecules if not np.isin(m.numbers, SPICE_DROP_ELEMENTS).any()]
    if len(kept) < n_train + n_test:
        raise DataError(f"only {len(kept)} SPICE molecules without P or I are left, fewer than "
                        f"--n_train_molecules {n_train} + --n_test_molecules {n_test}; pass "
                        "smaller numbers")
    order = np.random.default_rng(seed).permutation(len(kept))
    train = [kept[i] for i in order[:n_train]]
    test = [kept[i] for i in order[n_train:n_train + n_test]]
    return train, test, len(molecules) - len(kept)


# App. E's sizes: D0^SPICE ~3,500 molecules and ~9,500 conformations (high-energy only),
# D_test^SPICE ~7,000 molecules and ~18,000 conformations. The authors' code reads ready-made
# D-0-SPICE / D-test-SPICE dbs and does not say how they were drawn: here the conformations
# are spread as evenly as the molecules allow (2-3 a molecule), drawn at random (seeded).
SPICE_N_TRAIN_CONFORMATIONS = 9500
SPICE_N_TEST_CONFORMATIONS = 18000


def spread_evenly(capacities, total, rng):
    """How many of `total` items each group gives, as evenly as their capacities allow:
    every group an equal share, floor or ceil (which groups get the one more: drawn with
    rng); a group with fewer gives all it has, and the rest is spread over the others in the
    same way. total None: every item. Returns counts [n_groups] (ints, sum <= total)."""
    capacities = np.asarray(capacities, dtype=np.int64)
    if total is None:
        return capacities.copy()
    counts = np.zeros(len(capacities), dtype=np.int64)
    left = int(total)
    open_groups = np.flatnonzero(capacities > 0)
    while left > 0 and len(open_groups):
        share, extra = divmod(left, len(open_groups))
        for rank, g in enumerate(rng.permutation(open_groups)):   # the first `extra`: + 1
            give = min(share + (rank < extra), capacities[g] - counts[g])
            counts[g] += give
            left -= give
        open_groups = open_groups[counts[open_groups] < capacities[open_groups]]
    return counts


def spice_levels(n_conformations):
    """(indices of the high-energy conformations, of the low-energy ones) of a molecule with
    n conformations in the file (the order this section describes)."""
    return (list(range(min(n_conformations, SPICE_N_HIGH))),
            list(range(SPICE_N_HIGH, n_conformations)))


def spice_capacity(n_conformations, split):
    """Units a molecule can give to a split: D0^SPICE, its high-energy conformations;
    D_test^SPICE, pairs of one high- and one low-energy conformation."""
    high, low = spice_levels(n_conformations)
    return len(high) if split == "D0^SPICE" else min(len(high), len(low))


def spice_choice(n_conformations, split, n_units, rng):
    """Sorted indices of the conformations a molecule gives to a split: n_units high-energy
    ones (D0^SPICE), or n_units high- and n_units low-energy ones (D_test^SPICE, in equal
    parts as App. E), drawn without replacement with rng."""
    high, low = spice_levels(n_conformations)
    pick = lambda ids: [ids[i] for i in rng.choice(len(ids), n_units, replace=False)]  # noqa
    chosen = pick(high) if split == "D0^SPICE" else pick(high) + pick(low)
    return sorted(int(i) for i in chosen)
