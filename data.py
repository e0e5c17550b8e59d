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

Also here: batching of molecules of different sizes (flat atoms + molecule index), a
training sampler, the split into train/validation molecules, and the GOLF replay buffer.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
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

    def add(self, conf):
        self.collected.append(conf)

    def n_from_initial(self, batch_size):
        if not self.collected:
            return batch_size
        return int(round(self.initial_conf_pct * batch_size))

    def sample(self, batch_size):
        n0 = self.n_from_initial(batch_size)
        idx0 = self.rng.integers(len(self.initial), size=n0)
        idx1 = self.rng.integers(len(self.collected), size=batch_size - n0) if n0 < batch_size \
            else []
        return [self.initial[i] for i in idx0] + [self.collected[i] for i in idx1]


# ---------------------------------------------------------------------------------------
# Reliability: one writer per output, crash-safe JSON lines
# ---------------------------------------------------------------------------------------

@contextmanager
def output_lock(path):
    """Hold an advisory lock (flock) on an output for the whole run, so that two processes
    never write one output. `path` is a directory (lock file path/.writer.lock) or a file
    (lock file path.writer.lock). A second process gets a DataError naming the process
    that holds it.
    The kernel drops the lock when its holder dies, kill -9 included."""
    import fcntl
    import sys
    lock_path = os.path.join(path, ".writer.lock") if os.path.isdir(path) \
        else f"{path}.writer.lock"             # not path.lock: ase.db locks that one itself
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataError(f"{path} is being written by another process (PID {holder}); "
                            "wait for it to end, or write to another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # ase.db's own lock, <db>.lock, is a file created exclusively for each write: a kill
        # -9 in the middle of a write leaves it behind, and the next writer would wait for
        # it forever. Holding this lock, no other writer exists: such a file is stale.
        dbs = [path] if not os.path.isdir(path) else \
            [os.path.join(path, name) for name in os.listdir(path) if name.endswith(".db")]
        for db in dbs:
            if os.path.exists(f"{db}.lock"):
                os.remove(f"{db}.lock")
                print(f"removed {db}.lock, a lock a killed run left behind", file=sys.stderr)
        yield
    finally:
        os.close(fd)          # releases the lock; the file stays (deleting it would race)


def _split_tail(text):
    """(complete lines, partial last line or '') of a JSON-lines text."""
    head, sep, tail = text.rpartition("\n")
    return (head + sep, tail)


def read_jsonl(path):
    """The records of a JSON-lines file. A partial last line (a kill mid-write) is dropped
    with a warning; a bad line anywhere else is a DataError naming it."""
    import json
    import sys
    with open(path, errors="replace") as f:
        complete, tail = _split_tail(f.read())
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}, line {number}: not JSON; fix or remove the "
                                "line") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))          # complete, only its newline missing
        except json.JSONDecodeError:
            print(f"warning: {path}: dropped a partial last line (a write was "
                  "interrupted)", file=sys.stderr)
    return records


def cut_partial_line(path):
    """Cut a partial last line (a kill mid-write) off a JSON-lines file that this process
    writes (under its output_lock); a whole record that only lacks its newline gets one."""
    import json
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        text = f.read()
        if not text or text.endswith(b"\n"):
            return
        cut = text.rfind(b"\n") + 1                  # end of the last complete line
        try:
            json.loads(text[cut:])
            f.write(b"\n")
        except ValueError:
            f.truncate(cut)


def append_jsonl(path, record):
    """Append one record as one line in one write, after cutting off a partial last line
    that a kill left, so that it never glues onto the new record."""
    import json
    cut_partial_line(path)
    with open(path, "ab") as f:
        f.write((json.dumps(record) + "\n").encode())
