"""Relax your own molecules with a GOLF NNP, in batches, with a quality check on every result.

    python relax.py --in molecules.sdf --out relaxed.sdf
    python relax.py --in smiles.smi --conformers 10 --keep 3 --out best.sdf \\
        --checkpoint runs/golf/checkpoint.pt
    python relax.py --in molecules.xyz --out relaxed.db --check_with gfn2-xtb

GOLF's NNP-optimization (Tsypin et al., ICLR 2024, Eq. 3), s_{t+1} = Opt(s_t, F(s_t)), as a
tool: relaxation.FmaxRelaxation moves --batch_size molecules of any size at once with the
paper's L-BFGS (Table 5; --conf_opt adam | sgd: Table 6), one NNP call per evaluation, until
each molecule's largest atomic force |F_i| is at most --fmax or it took --steps steps.
Default model: the paper's f_GOLF-10k. The file follows a run: inputs (molecule_files.py
reads the files) and the model's domain; the relaxation, its quality check and retry;
outputs (SDF or ASE db, appended as results finish, so a rerun goes on where a run
stopped), with the conformer choice (--keep) and the genuine oracle's check (--check_with)
on the way; the summary; the command line.
docs/relax.md tells the details. Units: Angstrom, Hartree (and kcal/mol), forces in eV/A.
"""
import argparse
import collections
import contextlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from ase.data import chemical_symbols, covalent_radii, vdw_radii
from ase.units import Hartree as HARTREE_TO_EV
from tqdm import tqdm

import data
import make_trajectories
import molecule_files
import optimizers
import oracle_pool
import oracles
import painn
import relaxation
import safe_io

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                                  "official", "GOLF-10k.NNP_checkpoint_actor")
# --fmax units -> Hartree/Angstrom (the model's unit)
FORCE_UNITS = {"ev/a": 1.0 / HARTREE_TO_EV, "kcal/mol/a": 1.0 / data.HARTREE_TO_KCAL,
               "hartree/a": 1.0, "ha/a": 1.0}
STRUCTURAL_FLAGS = ("non_finite", "bond_broken", "bond_formed", "flown_off", "clash")


# ---------------------------------------------------------------------------------------
# Inputs: the molecules, the model's domain, the conformations
# ---------------------------------------------------------------------------------------

def domain_problem(m, elements):
    """Why the model cannot relax molecule m (None: it can)."""
    outside = sorted({int(z) for z in m.numbers} - elements)
    if outside:
        names = " ".join(chemical_symbols[z] for z in sorted(elements))
        return (f"element {', '.join(chemical_symbols[z] for z in outside)} is outside the "
                f"model's elements ({names})")
    if m.charge != 0:
        return f"charge {m.charge:+d}: the model knows neutral molecules only"
    if m.multiplicity != 1:
        return (f"spin multiplicity {m.multiplicity}: the model knows closed-shell "
                "molecules only")
    return "a single atom: nothing to relax" if m.n_atoms < 2 else None


def read_input(path, args, elements):
    """The molecules of the input file the model can relax (molecule_files.py reads it), and
    how many it cannot: one line each on stderr (where, why, what to do)."""
    read = molecule_files.reader(path)
    if args.conformers > 1 and read is not molecule_files.read_smiles:
        raise data.DataError(f"--conformers {args.conformers}: conformations are embedded from "
                             "SMILES only; give a SMILES file, or relax the input's own "
                             "conformations with --conformers 1")
    molecules, problems = read(path)
    why = [domain_problem(m, elements) for m in molecules]
    problems += [f"{m.where}: {w}; skipped" for m, w in zip(molecules, why) if w]
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    return [m for m, w in zip(molecules, why) if not w], len(problems)


class Tasks:
    """The conformations to relax, lazily (ETKDG embeds a molecule when its turn comes):
    iterating yields Tasks; expected[input index] is how many a molecule has (known once
    it is embedded). Keys done before are skipped (with --keep: the whole molecule)."""

    def __init__(self, molecules, args, done):
        self.args, self.done, self.expected = args, done, {}
        self.done_molecules = {index for index, _ in done}
        todo = [self.todo(m, len(m.conformers) or args.conformers) for m in molecules]
        self.molecules = [m for m, t in zip(molecules, todo) if t]
        self.total = sum(map(len, todo))

    def todo(self, m, n):
        """The indices of m's n conformations to relax."""
        if self.args.keep is not None:              # --keep: a molecule is done as a whole
            return [] if m.index in self.done_molecules else list(range(n))
        return [k for k in range(n) if (m.index, k) not in self.done]

    def __iter__(self):
        for m in self.molecules:
            if not m.conformers:                     # SMILES: ETKDGv3, seeded per molecule
                m.conformers = make_trajectories.embed(m.smiles, self.args.conformers,
                                                       self.args.seed + m.index)[1]
                if len(m.conformers) < self.args.conformers:
                    tqdm.write(f"warning: {m.where}: ETKDG embedded {len(m.conformers)} of "
                               f"{self.args.conformers} conformations of {m.smiles}",
                               file=sys.stderr)
            todo = self.todo(m, len(m.conformers))
            self.expected[m.index] = len(todo)
            for k in todo:
                yield Task(m, k, np.asarray(m.conformers[k], dtype=np.float64))


# ---------------------------------------------------------------------------------------
# The relaxation: Eq. 3 in refilled slots, each molecule stopped at --fmax; the quality
# check, and one retry
# ---------------------------------------------------------------------------------------

@dataclass
class Task:
    molecule: molecule_files.Molecule
    conformer: int                 # conformer index within the molecule
    start: np.ndarray              # [n_atoms, 3] Angstrom
    attempt: int = 1               # 2: the capped-step retry
    first: "Result | None" = None  # the retry's first attempt


@dataclass
class Result:
    task: Task
    positions: np.ndarray          # [n_atoms, 3] Angstrom, the relaxed conformation
    energy_start: float            # NNP energy at the start, Hartree
    energy: float                  # NNP energy at `positions`, Hartree
    max_force: float               # max_i |F_i| at `positions`, Hartree/A
    steps: int                     # optimizer steps taken (the paper's t)
    converged: bool                # max_force <= --fmax
    flags: list = field(default_factory=list)   # quality_flags, not_converged, energy_rose
    attempts: int = 1
    first_flags: list = field(default_factory=list)   # the first attempt's, when retried

    @property
    def failed(self):
        """Broken structure: never written as a relaxed molecule."""
        return any(f.split(":")[0] in STRUCTURAL_FLAGS for f in self.flags)


def relax_tasks(model, args, fmax, tasks):
    """Yields a Result for every Task of the iterable `tasks`, in finishing order: Eq. 3 in
    the --batch_size slots of a relaxation.FmaxRelaxation, each slot refilled from the queue
    (the retries first) as its molecule finishes. A first attempt with a flag is relaxed
    again from its start, every update capped at --retry_max_step (or half --max_step)."""
    engine = relaxation.FmaxRelaxation(model, args, args.batch_size, fmax, args.steps)
    cap = args.max_step if args.max_step is not None else math.inf
    caps = {1: cap, 2: min(cap / 2, args.retry_max_step) if args.max_step
            else args.retry_max_step}                  # Angstrom per atom and update
    queue, retries = iter(tasks), collections.deque()
    held = [None] * args.batch_size                    # the Task in each slot

    def refill(k):
        task = held[k] = retries.popleft() if retries else next(queue, None)
        if task is None:
            engine.empty(k)
        else:
            engine.fill(k, task.molecule.numbers, task.start, caps[task.attempt])

    for k in range(args.batch_size):
        refill(k)
    while any(task is not None for task in held):
        engine.step()                                  # s_t -> s_{t+1}, Eq. 3
        for k in torch.nonzero(engine.finished & engine.opt.active)[:, 0].tolist():
            task, (energy, max_force, steps) = held[k], engine.end[k].tolist()
            r = Result(task, engine.positions(k), float(engine.energy_start[k]), energy,
                       max_force, int(steps), max_force <= fmax, attempts=task.attempt)
            r.flags = quality_flags(task.molecule.numbers, task.start, r.positions,
                                    args.bond_factor, args.clash_fraction)
            if not r.converged:
                r.flags.append("not_converged")
            if r.energy > r.energy_start:              # an update went uphill
                r.flags.append("energy_rose")
            if r.flags and task.attempt == 1:
                retries.append(Task(task.molecule, task.conformer, task.start, 2, r))
            else:
                yield best_attempt(r)
            refill(k)


def best_attempt(result):
    """The result to report of a retry and its first attempt: the retry, unless only the
    first is intact, or both are and the first converged and the retry did not, or both
    converged (or both did not) and the first ends lower."""
    first = result.task.first
    if first is None:
        return result
    result.first_flags = first.flags
    rank = lambda r: (r.failed, not r.converged, r.energy)   # noqa: E731
    if not first.failed and rank(first) < rank(result):
        first.attempts, first.first_flags = 2, list(first.flags)
        return first
    return result


def quality_flags(numbers, start, end, bond_factor=1.25, clash_fraction=0.55, limit=3):
    """What went wrong between the start [n_atoms, 3] and the end [n_atoms, 3] (Angstrom) of
    a relaxation, as strings "kind:detail" (empty: nothing). Atoms i, j are bonded when
    closer than bond_factor (r_i + r_j), covalent radii (Cordero et al. 2008, ase.data):
    bonds ~1.0 of the sum, the nearest non-bonded pairs (1-3, hydrogen bonds) >= ~1.6.
      non_finite   a coordinate is NaN or inf
      bond_broken  bonded at the start, not at the end
      bond_formed  bonded at the end, not at the start
      flown_off    an atom with a neighbour at the start has none at the end
      clash        two atoms neither bonded nor sharing a neighbour at the start end
                   closer than clash_fraction (R_i + R_j), van der Waals radii (Bondi)
    Atoms are numbered from 1 in the details, as in an SDF file."""
    numbers = np.asarray(numbers)
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    if not np.isfinite(end).all():
        return ["non_finite"]
    r_cov = covalent_radii[numbers]
    bond_length = bond_factor * (r_cov[:, None] + r_cov[None, :])           # [n, n]
    off_diagonal = ~np.eye(len(numbers), dtype=bool)
    d_start = np.linalg.norm(start[:, None] - start[None, :], axis=-1)     # [n, n]
    d_end = np.linalg.norm(end[:, None] - end[None, :], axis=-1)
    bonded_start = (d_start < bond_length) & off_diagonal
    bonded_end = (d_end < bond_length) & off_diagonal

    def listed(kind, items):                     # "kind:a, b, c +2"
        more = f" +{len(items) - limit}" if len(items) > limit else ""
        return [f"{kind}:{', '.join(items[:limit])}{more}"] if items else []

    def pairs(mask, kind):
        return listed(kind, [f"{a + 1}-{b + 1} {d_end[a, b]:.2f} A"
                             for a, b in zip(*np.nonzero(np.triu(mask, 1)))])

    alone = bonded_start.any(1) & ~bonded_end.any(1)                         # [n]
    r_vdw = np.nan_to_num(vdw_radii[numbers], nan=2.0)
    share_neighbour = (bonded_start.astype(int) @ bonded_start.astype(int)) > 0   # 1-3 pairs
    contact = clash_fraction * (r_vdw[:, None] + r_vdw[None, :])
    clash = (d_end < contact) & ~bonded_start & ~share_neighbour & off_diagonal
    return (pairs(bonded_start & ~bonded_end, "bond_broken")
            + pairs(bonded_end & ~bonded_start, "bond_formed")
            + listed("flown_off", [f"{chemical_symbols[numbers[a]]}{a + 1}"
                                   for a in np.nonzero(alone)[0]])
            + pairs(clash, "clash"))


# ---------------------------------------------------------------------------------------
# Outputs: SDF records appended whole, or ASE db rows; what a rerun skips; on the way to
# them, the conformer choice (--keep) and the genuine oracle's check (--check_with)
# ---------------------------------------------------------------------------------------

def output_format(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".sdf", ".db"):
        raise data.DataError(f"--out {path}: the extension says the format; use .sdf or .db")
    if os.path.isdir(path):
        raise data.DataError(f"--out {path} is a directory; name a .sdf or .db file")
    return ext


def open_output(path, molecules):
    """The output, and the keys (input_index, conformer_index) done before: those it holds
    and those of <out>.failed.jsonl. An output whose molecule has other atoms than the
    input's is a DataError (the input changed)."""
    output = SdfOutput(path) if output_format(path) == ".sdf" else DbOutput(path)
    by_index, keys = {m.index: m for m in molecules}, output.keys()
    for index, _, n_atoms, numbers in keys:
        m = by_index.get(index)
        if m is not None and (n_atoms not in (None, m.n_atoms) or numbers is not None
                              and not np.array_equal(numbers, m.numbers)):
            raise data.DataError(f"{path}: input molecule {index} has other atoms than when "
                                 "this output was written: the input changed; write to "
                                 "another --out")
    done = {(index, conformer) for index, conformer, _, _ in keys}
    if os.path.exists(failed_path(path)):
        safe_io.cut_partial_line(failed_path(path))   # a kill mid-write (we hold the lock)
        done |= {(r["input_index"], r["conformer_index"])
                 for r in safe_io.read_jsonl(failed_path(path))}
    return output, done


def failed_path(out):
    return out + ".failed.jsonl"


def properties(r, rank, check):
    """The numbers written with a relaxed conformation (SDF properties, db keys)."""
    m, kcal = r.task.molecule, data.HARTREE_TO_KCAL
    props = {"input_index": m.index, "conformer_index": r.task.conformer,
             "nnp_energy_hartree": r.energy, "nnp_energy_kcal_mol": r.energy * kcal,
             "nnp_energy_drop_kcal_mol": (r.energy_start - r.energy) * kcal,
             "steps": r.steps, "max_force_eV_A": r.max_force * HARTREE_TO_EV,
             "converged": int(r.converged), "flags": "; ".join(r.flags) or "none",
             "attempts": r.attempts}
    if rank is not None:
        props["energy_rank"] = rank
    if check is not None:
        start, end = check
        props["oracle_start_hartree"] = start.energy if start.ok else "failed"
        props["oracle_end_hartree"] = end.energy if end.ok else "failed"
        if start.ok and end.ok:
            props["oracle_drop_kcal_mol"] = (start.energy - end.energy) * kcal
    return props


class SdfOutput(molecule_files.SdfFile):
    """SDF records appended whole (molecule_files.SdfFile), their keys read back."""

    @staticmethod
    def record_keys(record, names=("input_index", "conformer_index", "n_atoms")):
        found = [molecule_files.sdf_property(record, name) for name in names]
        return tuple(None if text is None else int(text) for text in found)

    def keys(self):
        """(input_index, conformer_index, n_atoms, None: no atomic numbers) of each record."""
        return [(*self.record_keys(record), None) for record in self.records()]

    def write(self, unit):
        """Append the records of [(Result, rank, oracle check)] in one write."""
        self.append([molecule_files.sdf_record(
            r.task.molecule.with_positions(r.positions),
            r.task.molecule.name or f"molecule {r.task.molecule.index}",
            {**properties(r, rank, check), "n_atoms": r.task.molecule.n_atoms})
            for r, rank, check in unit])

    def rewrite_sorted(self):
        """In input order, then lowest energy first (--keep), replaced atomically."""
        self.sort(lambda record: tuple(-1 if k is None else k for k in self.record_keys(
            record, ("input_index", "energy_rank", "conformer_index"))))


class DbOutput:
    """An ASE db in data.py's schema: one row per relaxed conformation (a row per SQLite
    transaction), keys: properties(); with --check_with, row.data holds the oracle's energy
    and forces at the relaxed geometry (a labelled conformation)."""

    def __init__(self, path):
        self.path = path
        self.db = data.connect_for_writing(path, source="relax.py")

    def keys(self):
        """(input_index, conformer_index, n_atoms, atomic numbers) of each row."""
        return [(row.input_index, row.conformer_index, row.natoms, row.numbers)
                for row in self.db.select(include_data=False) if row.get("input_index") is not None]

    def write(self, unit):
        """Write the rows of [(Result, rank, oracle check)] in one transaction."""
        with self.db:
            for r, rank, check in unit:
                m, end = r.task.molecule, check[1] if check is not None and check[1].ok else None
                conf = data.Conformation(numbers=m.numbers, positions=r.positions,
                                         energy=end.energy if end else None,
                                         forces=end.forces if end else None, smiles=m.smiles)
                name = {"name": m.name} if m.name else {}
                data.write_conformation(self.db, conf, **properties(r, rank, check), **name)

    def rewrite_sorted(self):
        data.rewrite_sorted(self.path, lambda row: (
            row.get("input_index", -1), row.get("energy_rank", 0), row.get("conformer_index", -1)))


def select_conformers(results, keep, rmsd_threshold):
    """--keep: the `keep` lowest NNP energies among intact results of one molecule, none
    within rmsd_threshold of a lower one kept. Returns (kept, n_duplicates)."""
    kept, n_duplicates = [], 0
    for r in sorted(results, key=lambda r: (r.energy, r.task.conformer)):
        if len(kept) == keep:
            break
        if any(r.task.molecule.heavy_atom_rmsd(r.positions, k.positions) < rmsd_threshold
               for k in kept):
            n_duplicates += 1
            continue
        kept.append(r)
    return kept, n_duplicates


class Finisher:
    """Collects results until a molecule's conformations are all in (--keep), has the
    genuine oracle check the ones to write at their start and end (--check_with), and
    writes a unit (a result, or with --keep a molecule's) once its checks are in."""

    def __init__(self, args, output, pool, summary):
        self.args, self.output, self.pool, self.summary = args, output, pool, summary
        self.waiting = collections.defaultdict(list)   # input index -> [Result] (--keep)
        self.checking = []                             # [(written, failed, oracle futures)]
        self.n_jobs = 0

    def add(self, result, tasks):
        index = result.task.molecule.index
        self.waiting[index].append(result)
        if self.args.keep is None or len(self.waiting[index]) == tasks.expected[index]:
            self.complete(self.waiting.pop(index))
        self.poll()

    def complete(self, results):
        written = intact = [r for r in results if not r.failed]
        if self.args.keep is not None:
            written, n_dup = select_conformers(intact, self.args.keep, self.args.rmsd_threshold)
            self.summary.n.update(duplicates=n_dup, not_kept=len(intact) - len(written) - n_dup)
        futures = [[self.submit(r.task.molecule, p) for p in (r.task.start, r.positions)]
                   for r in written] if self.pool is not None else []
        self.checking.append((written, [r for r in results if r.failed], futures))

    def submit(self, molecule, positions):
        self.n_jobs += 1
        conf = data.Conformation(numbers=molecule.numbers, positions=positions)
        return self.pool.submit(conf, self.n_jobs, charge=0, multiplicity=1)

    def poll(self, block=False):
        """Write every unit whose oracle results are in (all of them if block)."""
        still = []
        for written, failed, futures in self.checking:
            if not block and not all(f.done() for pair in futures for f in pair):
                still.append((written, failed, futures))
                continue
            oracle = ([tuple(f.result() for f in pair) for pair in futures]
                      or [None] * len(written))                  # [(start, end)] results
            ranks = [i + 1 if self.args.keep is not None else None for i in range(len(written))]
            # the relaxed ones first, in one write: they mark the molecule done (a kill
            # between the two writes loses only failure records, never a relaxation)
            self.output.write(list(zip(written, ranks, oracle)))
            for r, check in zip(written, oracle):
                self.summary.count_written(r, check)
            for r in failed:
                safe_io.append_jsonl(failed_path(self.args.out), {
                    "input_index": r.task.molecule.index, "conformer_index": r.task.conformer,
                    "name": r.task.molecule.name, "where": r.task.molecule.where,
                    "reason": "; ".join(r.flags), "first_attempt": "; ".join(r.first_flags),
                    "attempts": r.attempts, "steps": r.steps})
        self.checking = still

    def wait(self):
        for index, results in sorted(self.waiting.items()):   # ETKDG gave fewer conformers
            self.complete(results)
        self.waiting.clear()
        self.poll(block=True)


# ---------------------------------------------------------------------------------------
# The summary, and the run
# ---------------------------------------------------------------------------------------

class Summary:
    """The run's counts as it goes (n: results, retried, fixed, failed, written, converged,
    duplicates, not_kept, oracle_failed, problems), and its one-screen text."""

    def __init__(self, n_problems):
        self.n = collections.Counter(problems=n_problems)
        self.reasons = collections.Counter()        # structural flag -> failed results
        self.drops, self.oracle_drops = [], []       # energy drops, NNP and oracle, kcal/mol
        self.seconds = 0.0

    def count(self, r):
        retried = r.attempts == 2
        self.n.update(results=1, retried=retried, fixed=retried and not r.flags,
                      failed=r.failed)
        self.reasons.update(f.split(":")[0] for f in r.flags
                            if r.failed and f.split(":")[0] in STRUCTURAL_FLAGS)

    def count_written(self, r, check):
        self.n.update(written=1, converged=r.converged)
        self.drops.append((r.energy_start - r.energy) * data.HARTREE_TO_KCAL)
        if check is not None and all(c.ok for c in check):
            self.oracle_drops.append((check[0].energy - check[1].energy) * data.HARTREE_TO_KCAL)
        elif check is not None:
            self.n["oracle_failed"] += 1

    def text(self, args, fmax):
        n, d = self.n, np.array(self.oracle_drops)
        rate = n["results"] / self.seconds if self.seconds else float("nan")
        why = ", ".join(f"{k} {count}" for k, count in self.reasons.most_common())
        lines = [f"relaxed {n['results']} conformations in {self.seconds:.1f} s "
                 f"({rate:.2f} conformations/s; {os.path.relpath(args.checkpoint)})",
                 f"  written to {args.out}: {n['written']}, converged (max |F_i| <= "
                 f"{fmax * HARTREE_TO_EV:.4g} eV/A within {args.steps} steps): "
                 f"{n['converged']}, not converged (converged = 0): "
                 f"{n['written'] - n['converged']}"]
        if args.keep is not None:
            lines.append(f"  --keep {args.keep}: {n['duplicates']} duplicates (heavy-atom RMSD "
                         f"< {args.rmsd_threshold} A) and {n['not_kept']} higher ones left out")
        lines += [f"  flagged and retried with steps capped at {args.retry_max_step} A: "
                  f"{n['retried']}, of which intact and converged after it: {n['fixed']}",
                  f"  failed (not written; {failed_path(args.out)}): {n['failed']}"
                  + (f" ({why})" if why else ""),
                  f"  input molecules skipped (reasons above): {n['problems']}"]
        if self.drops:
            lines.append(f"  NNP energy drop: mean {np.mean(self.drops):.2f}, median "
                         f"{np.median(self.drops):.2f} kcal/mol")
        if args.check_with and len(d):
            lines.append(f"  {args.check_with} energy drop: mean {d.mean():.2f}, median "
                         f"{np.median(d):.2f} kcal/mol; it rose for {(d < 0).sum()} of "
                         f"{len(d)}; oracle failed for {n['oracle_failed']}")
        elif args.check_with and n["oracle_failed"]:
            lines.append(f"  {args.check_with}: the oracle failed for all {n['oracle_failed']}")
        return "\n".join(lines)


def relax(args):
    fmax = force_threshold(args.fmax, args.fmax_unit)                     # Hartree/A
    output_format(args.out)                                               # before any work
    model = painn.load_checkpoint(args.checkpoint, args.device).to(getattr(torch, args.dtype))
    model.eval()
    molecules, n_problems = read_input(args.input, args, painn.model_elements(model))
    if not molecules:
        print(f"error: {args.input}: no molecule the model can relax (reasons above)",
              file=sys.stderr)
        return 1
    with safe_io.output_lock(args.out):                                   # one writer
        output, done = open_output(args.out, molecules)
        tasks = Tasks(molecules, args, done)
        print(f"{tasks.total} conformations of {len(tasks.molecules)} molecules to relax, "
              f"{len(done)} done before in {args.out}; max |F_i| <= "
              f"{fmax * HARTREE_TO_EV:.4g} eV/A or {args.steps} steps, {args.conf_opt} "
              f"({args.dtype}, {args.device})")
        summary = Summary(n_problems)
        if args.check_with:
            torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(args))
        journal = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                               "oracle_journal.sqlite")        # every oracle result kept
        with (oracle_pool.make_oracle_pool(args, journal) if args.check_with
              else contextlib.nullcontext()) as pool:
            finish = Finisher(args, output, pool, summary)
            started = time.monotonic()
            with safe_io.progress(total=tasks.total, unit="conf", desc="relax",
                                  dynamic_ncols=True) as bar:
                for result in relax_tasks(model, args, fmax, tasks):
                    summary.count(result)
                    bar.update(1)
                    finish.add(result, tasks)          # --keep, oracle, write as finished
            summary.seconds = time.monotonic() - started
            finish.wait()
        output.rewrite_sorted()                                           # input order
    print(summary.text(args, fmax))
    return 0 if summary.n["written"] or done else 1


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def force_threshold(text, unit):
    """--fmax as Hartree/Angstrom: a number in --fmax_unit, or a number with its unit
    ("0.05", "0.05eV/A", "1.2 kcal/mol/A")."""
    m = re.fullmatch(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)\s*",
                     str(text))
    unit = ((m.group(2) if m else "") or unit).lower().replace("ang", "a")
    if not m or not float(m.group(1)) > 0 or unit not in FORCE_UNITS:
        raise data.DataError(f"--fmax {text!r}: expected a positive number with an optional "
                             "unit eV/A, kcal/mol/A or Hartree/A, e.g. 0.05 or 1kcal/mol/A")
    return float(m.group(1)) * FORCE_UNITS[unit]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="input", required=True,
                   help="molecules: .smi/.smiles/.txt (SMILES), .sdf, .xyz or .db (ASE)")
    p.add_argument("--out", required=True, help="relaxed conformations: .sdf or .db")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="our checkpoint.pt or an "
                   "official NNP_checkpoint_actor (default: the paper's f_GOLF-10k)")
    p.add_argument("--conformers", type=int, default=1,
                   help="SMILES input: ETKDGv3 conformations per molecule (default: 1)")
    p.add_argument("--keep", type=int, default=None, help="keep the M lowest NNP energies per "
                   "molecule after removing duplicates (default: every conformation)")
    p.add_argument("--rmsd_threshold", type=float, default=0.5, help="--keep: duplicates are "
                   "closer than this symmetry-aware heavy-atom RMSD (default: %(default)s A)")
    p.add_argument("--seed", type=int, default=42,
                   help="ETKDG seed (plus the molecule's input index)")
    p.add_argument("--fmax", default="0.05", help="stop a molecule when every |F_i| is at most "
                   "this, in --fmax_unit or with its unit (default: 0.05 eV/A, as ASE)")
    p.add_argument("--fmax_unit", default="eV/A", help="eV/A (default), kcal/mol/A or Hartree/A")
    p.add_argument("--steps", type=int, default=200, help="or after this many optimizer steps "
                   "(an L-BFGS step is up to --max_iter updates; default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="molecules relaxed at once")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="the NNP's dtype (the optimizer works in float64)")
    q = p.add_argument_group("quality check")
    q.add_argument("--retry_max_step", type=float, default=0.2, help="a flagged conformation "
                   "is relaxed again from its start, every update capped at this (default: "
                   "%(default)s A per atom)")
    q.add_argument("--bond_factor", type=float, default=1.25, help="bonded: closer than this "
                   "times the sum of the covalent radii (default: %(default)s)")
    q.add_argument("--clash_fraction", type=float, default=0.55, help="a clash: atoms neither "
                   "bonded nor sharing a neighbour at the start end closer than this fraction "
                   "of the sum of their van der Waals radii (default: %(default)s)")
    p.add_argument("--check_with", default=None, metavar="METHOD", help="genuine oracle energy "
                   "at the start and end of every written relaxation: gfn2-xtb, or a Psi4 "
                   "method/basis (default: no check)")
    optimizers.add_optimizer_args(p, convergence=False)     # a molecule stops at --fmax
    oracles.add_oracle_args(p, optimize=False, method=False)  # the pool of --check_with
    args = optimizers.parse_args_with_preset(p, argv)
    for name in ("batch_size", "steps", "conformers", "keep"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    args.oracle_method = args.check_with
    return args


def main(argv=None):
    """Exit codes: 0 done, 1 nothing relaxed, 2 bad input (one `error:` line), 130 / 143
    stopped by Ctrl-C / SIGTERM (one line; what was written is kept)."""
    args = parse_args(argv)
    try:
        with safe_io.StopSignals():
            return relax(args)
    except (data.DataError, painn.CheckpointError, oracles.OracleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except safe_io.Interrupted as stop:
        again = safe_io.continue_command(argv=None if argv is None else ["relax.py", *argv])
        print(safe_io.stopped_line(stop, f"every conformation written to {args.out} is kept "
                                   "and skipped when run again", again), file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
