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

HARTREE_TO_KCAL = 627.509474          # kcal/mol per Hartree
BOHR_TO_ANGSTROM = 0.529177210903     # Angstrom per Bohr
MAX_Z = 100                           # elements the model embeds (painn.MAX_Z)
ENERGY_KINDS = ("auto", "total", "formation")


class DataError(ValueError):
    """Bad input data: the message names the file and row, and what to do."""


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
