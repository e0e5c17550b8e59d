"""Labelled datasets from the genuine oracle (Psi4 DFT, or GFN2-xTB): GOLF's D0, D_traj-K,
D_rdkit and D-test.

Tsypin et al. (ICLR 2024) train NNPs on conformations labelled with DFT energies and forces:
    --mode single_point  energy and forces of every conformation           -> D0-type db
    --mode optimize      an oracle optimization of every conformation: every
                         step (D_traj-K: --max_conformations K stops at K rows
                         of steps >= 1), and each start with its optimum
                         (--out_optimal)                                    -> D-test-type db
    --mode mmff          MMFF94-minimize every conformation, then label it  -> D_rdkit db
    --spice FILE         D0^SPICE (--out) and D_test^SPICE (--out_test) of App. E's sizes,
                         labelled by the oracle as Sec. 6.3 (--spice_labels own: SPICE's
                         own labels; make_spice)

Conformations come from a SMILES file (RDKit ETKDGv3, as nablaDFT made its conformations;
`SMILES [name]` per line, # starts a comment) or from an existing db (--db); --min_atoms /
--max_atoms keep molecules of a size range (App. D: 17-35 atoms; Table 4's D_LM: 36-57).
A run first prints how many molecules it read, how many are in the size range and how many
--skip_molecules / --max_molecules take; none taken is an error (before any output is
written), fewer than --max_molecules a warning.
--conformer_selection butina is App. D's recipe (nablaDFT's): embed --n_etkdg ETKDG
conformations, cluster them (Butina) by heavy-atom RMSD after the best alignment over
symmetry-equivalent atom orders (rdMolAlign.GetAllConformerBestRMS), and keep the centroids
of the fewest clusters, largest first, that hold >= --butina_coverage of the conformations.
Example:

    python make_trajectories.py --smiles data/small_molecules.smi --max_molecules 20 \\
        --mode single_point --out runs/d0.db --oracle_method hf/sto-3g
    python make_trajectories.py --db runs/d0.db --shuffle --mode optimize \\
        --max_conformations 400 --out runs/traj.db --oracle_method hf/sto-3g   # D_traj-K

Output rows (data.py's schema: positions Angstrom, total energy Hartree, forces
Hartree/Angstrom in row.data; keys):
    --out, single_point / mmff: one row per conformation; keys conf_id, smiles, name
    --out, optimize: one row per optimization step; keys conf_id, step (0 = the start),
        smiles, name. With --max_conformations K (D_traj-K), steps >= 1 only: the K
        conformations D_traj-K adds to D0; step 0 is the input row itself (in D0 already,
        and in --out_optimal with its optimum)
    --out_optimal, optimize: one row per conformation: its start (positions, energy,
        forces) with optimal_energy and optimal_positions (the last step); keys conf_id,
        smiles, name, converged (False: --max_opt_steps ran out), n_steps
    metadata: method (--oracle_method), mode, seed, conformers_per_molecule, source; atomrefs:
        energies of the free atoms at the oracle's level (nablaDFT's own values for its
        level, wb97x-d/def2-svp), the per-element references the NNP learns on top of.
The SMILES is stored as written in the file: the atom order of a row follows it.

conf_id: with --smiles, (line number - 1) * conformers_per_molecule + k for the k-th
conformer of the line (butina: (line number - 1) * --n_etkdg + the cluster's rank, largest
first); ETKDG is seeded with --seed + line number, so a rerun makes the same conformations
and ids. With --db, the input row id (its own conf_id, if any, goes to the key
source_conf_id).

D_traj-K (--max_conformations K, --mode optimize): conformations are taken in conf_id
order (--shuffle: a permutation seeded by --seed, --db only); every step t >= 1 of every
optimization is written as it arrives, no new job starts once the finished optimizations
at the head of that order hold K such steps, and at the end --out keeps exactly the first
K in that order (the last trajectory cut at K). Which rows D_traj-K holds thus does not
depend on the order results arrive in. Psi4 optimizes in --opt_coordinates (default
Cartesian, as App. D's nablaDFT trajectories) until it converges (--max_opt_steps: a
safety cap); the choice is kept in the outputs' metadata.

Resuming: every result is written the moment it arrives, in one SQLite transaction, so
`kill -9` loses no finished result. At the end of a run, --out and --out_optimal are
rewritten with their rows sorted by (conf_id, step) (a temporary db, then os.replace), so
the same command gives the same rows in the same order, whatever the arrival order (ASE's
per-row ctime/user columns are the rewrite's; nothing reads them). A rerun of the
same command skips finished conformations (conf_id in --out; for optimize, in
--out_optimal) and retries all others, failed ones included. Failures that will repeat
(no basis for an element, an unknown method, no MMFF types) are not retried within a run
and are marked so; a run in which every conformation failed exits with status 1. One
process writes an output at a time (a lock file <out>.writer.lock). Failures are appended
to <out>.failures.jsonl (one JSON per line: conf_id, smiles, mode, reason, seconds, attempts,
steps, time). The steps an optimization finished before failing are written to --out
anyway; a rerun replaces them with its own.

The oracle journal, <out>.oracle_journal.sqlite (--oracle_journal names another), keeps
every successful oracle result, the free atoms' included, keyed by its question (atoms,
positions, charge, multiplicity, kind, method): a result is on disk the moment it arrives,
and a rerun that asks the same question reads it instead of computing it again.
SIGTERM (a scheduler's) or Ctrl-C stops the run at once: the jobs running are dropped, the
oracle workers end, and one line names what is written and the command to continue (the
same command); exit status 143 (SIGTERM) or 130 (Ctrl-C).
"""
import argparse
import collections
import dataclasses
import datetime
import os
import sys
from concurrent.futures import FIRST_COMPLETED, wait
from contextlib import ExitStack

import ase.db
import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem, rdMolAlign
from rdkit.ML.Cluster import Butina
from tqdm import tqdm

import data
import oracle_pool
import oracles
import safe_io
from data import Conformation

OWN_KEYS = ("conf_id", "step", "converged", "n_steps")   # keys this script sets itself


def count_or_all(text):
    """A count flag's value: a positive integer, or 'all' (None)."""
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 or 'all', not {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--smiles", help="SMILES file, one molecule per line ('SMILES [name]')")
    source.add_argument("--db", help="ASE db of conformations to label")
    source.add_argument("--spice", help="SPICE HDF5 release (SPICE-*.hdf5): write D0^SPICE to "
                                        "--out and D_test^SPICE to --out_test")
    spice = parser.add_argument_group("--spice (App. E)")
    spice.add_argument("--out_test", help="D_test^SPICE db")
    spice.add_argument("--n_train_molecules", type=int, default=3500,
                       help="molecules of D0^SPICE (default: %(default)s)")
    spice.add_argument("--n_test_molecules", type=int, default=7000,
                       help="other molecules, of D_test^SPICE (default: %(default)s)")
    spice.add_argument("--spice_subset", default="pubchem",
                       help="keep groups whose subset contains this (default: %(default)s, "
                            "SPICE's drug-like molecules; '' keeps all)")
    spice.add_argument("--n_train_conformations", type=count_or_all,
                       default=data.SPICE_N_TRAIN_CONFORMATIONS,
                       help="high-energy conformations of D0^SPICE, spread evenly over its "
                            "molecules (default: %(default)s, App. E; 'all': every one)")
    spice.add_argument("--n_test_conformations", type=count_or_all,
                       default=data.SPICE_N_TEST_CONFORMATIONS,
                       help="conformations of D_test^SPICE, half high- and half low-energy, "
                            "spread evenly (default: %(default)s, App. E; 'all': every "
                            "high/low pair)")
    spice.add_argument("--spice_labels", choices=("oracle", "own"), default="oracle",
                       help="oracle: label every chosen conformation with --oracle_method, the "
                            "paper's O_G (default; Sec. 6.3); own: keep SPICE's "
                            "wB97M-D3BJ/def2-TZVPPD labels")
    parser.add_argument("--conformers_per_molecule", type=int, default=None,
                        help="--conformer_selection first: ETKDGv3 conformations per SMILES "
                             "line (default: 1)")
    parser.add_argument("--conformer_selection", choices=("first", "butina"), default="first",
                        help="first: the first --conformers_per_molecule ETKDG conformations; "
                             "butina: App. D's Butina centroids of --n_etkdg ETKDG conformations")
    parser.add_argument("--n_etkdg", type=int, default=50,
                        help="butina: ETKDG conformations clustered per molecule (our choice; "
                             "App. D gives no number)")
    parser.add_argument("--butina_threshold", type=float, default=1.25,
                        help="butina: heavy-atom RMSD (Angstrom) within which conformations are "
                             "neighbours (our choice: 3.1-3.2 centroids per molecule of 17-35 "
                             "atoms of data/moses_sample.smi in run.sh's D0s, nablaDFT: 2.5)")
    parser.add_argument("--butina_coverage", type=float, default=0.95,
                        help="butina: the kept clusters hold at least this share of the "
                             "conformations (App. D: 95%%)")
    parser.add_argument("--shuffle", action="store_true",
                        help="--db: take the rows in an order seeded by --seed, not row order "
                             "(with --max_conformations: which rows D_traj-K starts from)")
    parser.add_argument("--seed", type=int, default=42,
                        help="ETKDG seed (plus line number); --shuffle's seed")
    parser.add_argument("--skip_molecules", type=int, default=0,
                        help="skip the first N molecules (lines of --smiles, rows of --db)")
    parser.add_argument("--max_molecules", type=int, default=None,
                        help="then take at most N molecules (e.g. to split train/test)")
    parser.add_argument("--min_atoms", type=int, default=None,
                        help="only molecules of at least N atoms, hydrogens included (App. D: "
                             "17 for D0; Table 4's D_LM: 36); applied before --skip/--max_molecules")
    parser.add_argument("--max_atoms", type=int, default=None,
                        help="only molecules of at most N atoms (App. D: 35; D_LM: 57)")
    parser.add_argument("--mode", choices=("single_point", "optimize", "mmff"),
                        default="single_point")
    parser.add_argument("--out", required=True, help="output db")
    parser.add_argument("--out_optimal", default=None,
                        help="--mode optimize: db of the starts with their optima "
                             "(default: <out>_optimal.db)")
    parser.add_argument("--max_conformations", type=int, default=None,
                        help="K: stop when --out has K rows (D_traj-K; --mode optimize: K "
                             "steps t >= 1, the start being the input row itself)")
    parser.add_argument("--mmff_max_iters", type=int, default=oracles.MMFF_MAX_ITERS,
                        help="--mode mmff: most MMFF minimization iterations (evaluate.py's RDKit "
                             "row uses the same default); not converged: logged as a failure")
    oracles.add_oracle_args(parser)
    args = parser.parse_args(argv)
    for name in ("conformers_per_molecule", "max_molecules", "max_conformations",
                 "mmff_max_iters", "min_atoms", "max_atoms", "n_etkdg"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.spice and not args.out_test:
        parser.error("--spice needs --out_test (the D_test^SPICE db)")
    if args.spice and args.mode != "single_point":
        parser.error("--spice labels the chosen conformations (as --mode single_point); "
                     "optimize D_test^SPICE afterwards with --db OUT_TEST --mode optimize")
    if args.skip_molecules < 0:
        parser.error("--skip_molecules must be at least 0")
    if args.min_atoms and args.max_atoms and args.min_atoms > args.max_atoms:
        parser.error(f"--min_atoms {args.min_atoms} is above --max_atoms {args.max_atoms}")
    if args.conformer_selection == "butina":
        if args.db or args.conformers_per_molecule is not None:
            parser.error("--conformer_selection butina makes conformations from --smiles; it "
                         "keeps as many as App. D's clusters need (no --conformers_per_molecule)")
        if not 0 < args.butina_coverage <= 1 or args.butina_threshold <= 0:
            parser.error("--butina_coverage must be in (0, 1] and --butina_threshold positive")
    elif args.conformers_per_molecule is None:
        args.conformers_per_molecule = 1
    if args.shuffle and not args.db:
        parser.error("--shuffle is for --db (a SMILES file is taken in line order)")
    if args.out_optimal and args.mode != "optimize":
        parser.error("--out_optimal is for --mode optimize")
    if oracles.is_xtb(args.oracle_method) and args.opt_coordinates != "cartesian":
        parser.error(f"--opt_coordinates {args.opt_coordinates} is for Psi4's optimizer; "
                     "xTB's BFGS works in Cartesian coordinates only")
    if args.mode == "optimize" and not args.out_optimal:
        args.out_optimal = os.path.splitext(args.out)[0] + "_optimal.db"
    if args.out_optimal and os.path.abspath(args.out_optimal) == os.path.abspath(args.out):
        parser.error("--out_optimal must differ from --out")
    return args


# ---------------------------------------------------------------------------------------
# Conformations to label
# ---------------------------------------------------------------------------------------

def read_smiles_file(path):
    """[(line_number, smiles, name or None)] of the molecule lines of a SMILES file."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: no such SMILES file")
    lines = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split(maxsplit=1)
            if fields and not fields[0].startswith("#"):
                name = fields[1].strip() if len(fields) > 1 else None
                lines.append((line_number, fields[0], name))
    return lines


def parse_smiles(smiles):
    RDLogger.DisableLog("rdApp.*")   # our warning names the line; RDKit's would not
    mol = Chem.MolFromSmiles(smiles)
    RDLogger.EnableLog("rdApp.*")
    return mol


def etkdg_molecule(smiles, n_conformers, seed):
    """RDKit molecule with hydrogens added after the heavy atoms (the atom order of nablaDFT
    rows) and up to n_conformers ETKDGv3 conformers (seeded, one thread: reproducible)."""
    mol = Chem.AddHs(parse_smiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    AllChem.EmbedMultipleConfs(mol, n_conformers, params)
    return mol


def embed(smiles, n_conformers, seed):
    """ETKDGv3 conformations of a SMILES: numbers [n_atoms], [positions [n_atoms, 3] Angstrom]."""
    mol = etkdg_molecule(smiles, n_conformers, seed)
    numbers = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()])
    return numbers, [conf.GetPositions() for conf in mol.GetConformers()]


def butina_clusters(mol, rmsd_threshold):
    """Butina clusters of a molecule's conformers, largest first (ties: Butina's order), each
    a tuple of conformer indices with its centroid first. Distance: heavy-atom RMSD after the
    best alignment over symmetry-equivalent atom orders (GetBestRMS for every pair)."""
    heavy = Chem.RemoveHs(mol)                     # keeps the conformers
    n = heavy.GetNumConformers()
    if heavy.GetNumAtoms() < 2:                    # one heavy atom: all alike
        distances = [0.0] * (n * (n - 1) // 2)
    else:
        distances = rdMolAlign.GetAllConformerBestRMS(heavy)   # [(1,0), (2,0), (2,1), ...]
    clusters = Butina.ClusterData(distances, n, rmsd_threshold, isDistData=True, reordering=True)
    return sorted(clusters, key=len, reverse=True)          # sorted() is stable


def butina_centroids(smiles, n_etkdg, seed, rmsd_threshold, coverage):
    """App. D (nablaDFT's recipe): embed n_etkdg ETKDG conformations, cluster them, and keep
    the centroids of the fewest clusters, largest first, that hold >= coverage of them.
    Returns numbers [n_atoms], [positions [n_atoms, 3] Angstrom] (largest cluster first),
    and the number of conformations ETKDG embedded."""
    mol = etkdg_molecule(smiles, n_etkdg, seed)
    numbers = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()])
    conformers = [conf.GetPositions() for conf in mol.GetConformers()]
    kept, covered = [], 0
    for cluster in butina_clusters(mol, rmsd_threshold) if conformers else []:
        if covered >= coverage * len(conformers):
            break
        kept.append(conformers[cluster[0]])
        covered += len(cluster)
    return numbers, kept, len(conformers)


def smiles_conformations(args, lines, done, warn):
    """(conf_id, Conformation) of the lines not finished yet, embedded only when needed."""
    n = args.conformers_per_molecule
    for line_number, smiles, name in lines:
        ids = [(line_number - 1) * n + k for k in range(n)]
        todo = [k for k in range(n) if ids[k] not in done]
        if not todo:
            continue
        numbers, conformers = embed(smiles, n, args.seed + line_number)
        if len(conformers) < n:
            warn(f"warning: {args.smiles} line {line_number}: ETKDG embedded "
                 f"{len(conformers)} of {n} conformations of {smiles}",
                 len([k for k in todo if k >= len(conformers)]))
        for k in todo:
            if k < len(conformers):
                yield ids[k], Conformation(numbers, conformers[k], smiles=smiles,
                                           info={"name": name} if name else {})


def butina_conformations(args, lines):
    """(conf_id, Conformation) of App. D's Butina centroids of every line."""
    for line_number, smiles, name in safe_io.progress(lines, desc="ETKDG + Butina",
                                                      unit="mol", dynamic_ncols=True):
        numbers, centroids, n_embedded = butina_centroids(
            smiles, args.n_etkdg, args.seed + line_number, args.butina_threshold,
            args.butina_coverage)
        if n_embedded < args.n_etkdg:
            tqdm.write(f"warning: {args.smiles} line {line_number}: ETKDG embedded "
                       f"{n_embedded} of {args.n_etkdg} conformations of {smiles}",
                       file=sys.stderr)
        for rank, positions in enumerate(centroids):
            yield (line_number - 1) * args.n_etkdg + rank, Conformation(
                numbers, positions, smiles=smiles, info={"name": name} if name else {})


def n_atoms_with_hydrogens(smiles):
    """Atoms of a SMILES with hydrogens added; None if RDKit cannot parse it."""
    mol = parse_smiles(smiles)
    return None if mol is None else Chem.AddHs(mol).GetNumAtoms()


def in_size_range(n_atoms, args):
    """--min_atoms <= n_atoms <= --max_atoms (None: no bound; an unparsable SMILES passes,
    to be reported by name later)."""
    return n_atoms is None or ((args.min_atoms is None or n_atoms >= args.min_atoms) and
                               (args.max_atoms is None or n_atoms <= args.max_atoms))


def selected(items, args):
    end = None if args.max_molecules is None else args.skip_molecules + args.max_molecules
    return items[args.skip_molecules:end]


def report_selection(args, path, what, n_read, n_sized, n_taken):
    """Print what --min_atoms / --max_atoms and --skip_molecules / --max_molecules leave of
    the input. None left is a DataError; fewer than --max_molecules, a warning."""
    bounds = [f"at least {args.min_atoms}" if args.min_atoms else "",
              f"at most {args.max_atoms}" if args.max_atoms else ""]
    size = (f"{args.min_atoms}-{args.max_atoms}" if all(bounds) else "".join(bounds)) + " atoms"
    sized = f", {n_sized} with {size}" if any(bounds) else ""
    print(f"{path}: {n_read} {what} read{sized}, {n_taken} taken (--skip_molecules "
          f"{args.skip_molecules}, --max_molecules {args.max_molecules or 'all'})")
    if n_taken == 0:
        if n_read == 0:
            why = "it holds none"
        elif n_sized == 0:
            why = f"none of its {n_read} has {size}; change --min_atoms / --max_atoms"
        else:
            why = (f"--skip_molecules {args.skip_molecules} skips all {n_sized}"
                   f"{' with ' + size if any(bounds) else ''}; use a --skip_molecules below "
                   f"{n_sized}")
        raise data.DataError(f"{path}: no {what} to label: {why}")
    if args.max_molecules is not None and n_taken < args.max_molecules:
        print(f"warning: {path}: only {n_taken} {what} left to take, not the --max_molecules "
              f"{args.max_molecules} asked", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

def open_output(path, args, atomrefs):
    """Open (or create) an output db; a db made with other flags is refused, since its
    conf_ids would mean other conformations."""
    source = os.path.basename(args.smiles or args.db or args.spice)
    metadata = {"method": args.oracle_method, "mode": args.mode, "seed": args.seed,
                "conformers_per_molecule": args.conformers_per_molecule, "source": source,
                "conformer_selection": args.conformer_selection, "shuffle": args.shuffle}
    if args.spice:                            # which molecules and conformations, and labels
        metadata.update(split=args.spice_split, subset=args.spice_subset,
                        spice_labels=args.spice_labels,
                        n_train_molecules=args.n_train_molecules,
                        n_test_molecules=args.n_test_molecules,
                        n_train_conformations=args.n_train_conformations or "all",
                        n_test_conformations=args.n_test_conformations or "all")
    if args.conformer_selection == "butina":
        metadata.update(n_etkdg=args.n_etkdg, butina_threshold=args.butina_threshold,
                        butina_coverage=args.butina_coverage)
    if args.mode == "optimize":               # other coordinates, other trajectories
        metadata["opt_coordinates"] = args.opt_coordinates
    try:
        db = data.connect_for_writing(path, atomrefs=atomrefs, **metadata)
        old = db.metadata
        if atomrefs and "atomrefs" not in old:     # an earlier run could not compute them
            db.metadata = {**old, "atomrefs": {"energy": data.atomrefs_list(atomrefs)}}
    except Exception as err:
        raise data.DataError(f"{path}: cannot open it as an ASE database ({err})") from None
    flags = {"method": "--oracle_method", "mode": "--mode", "seed": "--seed",
             "conformers_per_molecule": "--conformers_per_molecule", "source": "--smiles/--db",
             "conformer_selection": "--conformer_selection", "shuffle": "--shuffle",
             "n_etkdg": "--n_etkdg", "butina_threshold": "--butina_threshold",
             "butina_coverage": "--butina_coverage", "opt_coordinates": "--opt_coordinates",
             "split": "--out/--out_test as", "subset": "--spice_subset",
             "spice_labels": "--spice_labels", "n_train_molecules": "--n_train_molecules",
             "n_test_molecules": "--n_test_molecules",
             "n_train_conformations": "--n_train_conformations",
             "n_test_conformations": "--n_test_conformations"}
    for key, flag in flags.items():
        if key in old and old[key] != metadata.get(key):
            raise data.DataError(f"{path} was made with {flag} {old[key]}, not "
                                 f"{metadata.get(key)}; rerun with the same flags or write to "
                                 "a new --out")
    return db


def journal_path(args):
    """The oracle journal: --oracle_journal, else <out>.oracle_journal.sqlite."""
    return args.oracle_journal or f"{args.out}.oracle_journal.sqlite"


def finished_ids(db):
    return {row.get("conf_id") for row in db.select(include_data=False)} - {None}


def row_keys(conf):
    """Key-value pairs a conformation carries to its output rows (name, input keys; an input
    row's conf_id as source_conf_id)."""
    keys = {k: v for k, v in conf.info.items() if k not in OWN_KEYS}
    if "conf_id" in conf.info:
        keys["source_conf_id"] = conf.info["conf_id"]
    return keys


def write_trajectory(db, conf, conf_id, result, room, first_step=0):
    """The steps t >= first_step of one optimization in one transaction, replacing the rows
    of an earlier (failed, partial) attempt unless those are more. At most `room` new rows
    (None: no cap). Returns the number of rows added."""
    old = [row.id for row in db.select(conf_id=conf_id, include_data=False)]
    n = result.n_steps - first_step                      # steps first_step .. n_steps - 1
    if room is not None:
        n = min(n, room + len(old))
    if n <= 0 or n < len(old):
        return 0
    with db:
        if old:
            db.delete(old)
        for t in range(first_step, first_step + n):
            step = Conformation(conf.numbers, result.trajectory_positions[t],
                                energy=float(result.trajectory_energy[t]),
                                forces=result.trajectory_forces[t], smiles=conf.smiles)
            data.write_conformation(db, step, conf_id=conf_id, step=t, **row_keys(conf))
    return n - len(old)


def write_result(args, out, optimal, conf, conf_id, result, room):
    """Write one oracle result the moment it arrives; returns the rows added to --out.
    optimize: the steps (also those of a failed optimization) to --out, and the start
    with its optimum to --out_optimal; else the labelled conformation to --out."""
    if args.mode == "optimize":
        # D_traj-K holds K conformations D0 lacks: not step 0, the D0 row itself
        first_step = 0 if args.max_conformations is None else 1
        n_rows = write_trajectory(out, conf, conf_id, result, room, first_step)
        if result.ok:
            start = dataclasses.replace(conf, energy=result.energy, forces=result.forces,
                                        optimal_energy=result.optimal_energy,
                                        optimal_positions=result.optimal_positions)
            data.write_conformation(optimal, start, conf_id=conf_id,
                                    converged=bool(result.converged), n_steps=result.n_steps,
                                    **row_keys(conf))
        return n_rows
    if not result.ok or room == 0:
        return 0
    labelled = dataclasses.replace(conf, energy=result.energy, forces=result.forces)
    data.write_conformation(out, labelled, conf_id=conf_id, **row_keys(conf))
    return 1


def canonical_key(row):
    """The order of a finished output db: (conf_id, step), rows without them last."""
    conf_id = row.get("conf_id")
    return (conf_id is None, conf_id or 0, row.get("step", 0), row.id)


def log_failure(path, conf, conf_id, mode, reason, result=None):
    """Append one failure to the <out>.failures.jsonl sidecar (one write; a partial line
    left by a kill is cut off before the next record)."""
    record = {"conf_id": int(conf_id), "smiles": conf.smiles, "mode": mode, "reason": reason,
              "seconds": round(result.seconds, 3) if result else 0.0,
              "attempts": result.attempts if result else 0,
              "steps": result.n_steps if result else 0,
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    safe_io.append_jsonl(path, record)


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------

def atomrefs_for(args, elements):
    """Per-element reference energies for the metadata: free-atom energies at the oracle's
    level (what nablaDFT's atomrefs are; its own values for its level), or those an
    existing output db, or the --db made with the same --oracle_method, already holds."""
    import painn
    if args.oracle_method.lower().replace(" ", "") == oracles.DEFAULT_METHOD:
        return painn.NABLADFT_ATOMREFS
    for path in (args.out, args.out_optimal, args.db):
        if path and os.path.exists(path):
            try:
                metadata = ase.db.connect(path).metadata
            except Exception:    # not a db: open_output says so in one line
                continue
            if path == args.db and metadata.get("method") != args.oracle_method:
                continue
            refs = data.read_atomrefs(metadata)
            if refs and set(elements) <= set(refs):
                return refs
    print(f"atomrefs: energies of the free atoms {sorted(elements)} with {args.oracle_method}")
    try:
        with oracle_pool.make_oracle_pool(args, journal_path(args)) as pool:
            return oracles.isolated_atom_energies(pool, elements)
    except oracles.OracleError as err:   # not fatal: a rerun fills them in
        print(f"warning: no atomrefs in the metadata ({err}); rerun to compute them, or "
              "training fits per-element references by least squares", file=sys.stderr)
        return None


def make_spice(args):
    """D0^SPICE and D_test^SPICE (Sec. 6.3, App. E). Of the PubChem molecules without P or I,
    --n_train_molecules for D0^SPICE and --n_test_molecules others for D_test^SPICE (seeded
    shuffle); D0^SPICE takes --n_train_conformations high-energy conformations of its
    molecules, D_test^SPICE --n_test_conformations, high- and low-energy in equal parts (data.py's
    SPICE section says how the release marks them), spread evenly over the molecules and drawn
    at random (seeded per molecule: a rerun picks the same). Sec. 6.3 uses "the same DFT-based
    oracle" O_G on SPICE, so by default (--spice_labels oracle) every chosen conformation is
    labelled by --oracle_method (as --mode single_point; the authors' SPICE models predict
    wB97X-D/def2-SVP energies above nablaDFT's atomrefs). --spice_labels own keeps SPICE's
    labels (wB97M-D3BJ/def2-TZVPPD, SPICE's atomrefs): then every later stage must label at
    that level. conf_id = 1000 * (the molecule's index among the file's groups, sorted) + its
    index in the group; a rerun does only what is missing."""
    import h5py
    molecules, skipped = data.read_spice(args.spice, args.spice_subset or None)
    train, test, n_dropped = data.spice_splits(molecules, args.n_train_molecules,
                                               args.n_test_molecules, args.seed)
    print(f"{args.spice}: {len(molecules)} molecules read, {n_dropped} with P or I dropped, "
          + ", ".join(f"{n} left out ({why})" for why, n in skipped.items()))
    splits = (("D0^SPICE", args.out, train, args.n_train_conformations),
              ("D_test^SPICE", args.out_test, test, args.n_test_conformations))
    with ExitStack() as locks:        # one writer per output, for the whole run
        for path in (args.out, args.out_test):
            if os.path.isdir(path):
                raise data.DataError(f"{path} is a directory; --out and --out_test name db "
                                     "files")
            locks.enter_context(safe_io.output_lock(path))
        with h5py.File(args.spice, "r") as f:
            index = {name: i for i, name in enumerate(sorted(f))}
            chosen = [spice_selection(args, f, index, split, of, n) for split, _, of, n in splits]
            check_spice_order(f, train + test)
        status = 0
        for (split, path, _, _), confs in zip(splits, chosen):
            split_args = argparse.Namespace(**{**vars(args), "out": path, "out_optimal": None,
                                               "mode": "single_point", "spice_split": split})
            if args.spice_labels == "own":
                split_args.oracle_method = data.SPICE_METHOD
                write_spice_labels(split_args, confs)
            else:
                elements = {int(z) for c in confs for z in c.numbers}
                status = max(status, label(split_args, None, confs, elements))
    if args.spice_labels == "own":
        print(f"labels: SPICE's own, {data.SPICE_METHOD}, not the paper's O_G: label new data "
              "at the same level (--oracle_method wb97m-d3bj/def2-tzvppd for golf.py and for "
              f"the optima: make_trajectories.py --db {args.out_test} --mode optimize "
              "--out ... --out_optimal ...)")
    else:
        print(f"labels: {args.oracle_method} (the genuine oracle O_G, Sec. 6.3). The test "
              f"optima: make_trajectories.py --db {args.out_test} --mode optimize --out ... "
              "--out_optimal ... --opt_coordinates redundant (App. E: SPICE's trajectories "
              "were not optimized in App. D's Cartesian coordinates; optking's default, "
              "redundant internals, is our reading)")
    return status


def spice_selection(args, f, index, split, molecules, n_conformations):
    """The Conformations (id = conf_id, info: name, spice_index, energy_level) a split takes
    of its molecules in the open SPICE file `f`, in conf_id order."""
    counts = [len(f[m.name]["dft_total_energy"]) for m in molecules]     # in the file
    capacity = [data.spice_capacity(n, split) for n in counts]
    share = 1 if split == "D0^SPICE" else 2          # conformations a unit holds
    total = None if n_conformations is None else n_conformations // share
    units = data.spread_evenly(capacity, total,
                               np.random.default_rng([args.seed, 1 if share == 1 else 2]))
    confs = []
    for molecule, n, k in zip(molecules, counts, units):
        rng = np.random.default_rng([args.seed, index[molecule.name]])    # per molecule
        keep = set(data.spice_choice(n, split, int(k), rng))
        for c in data.read_spice_conformations(f, molecule):
            if c.info["spice_index"] in keep:
                confs.append(dataclasses.replace(
                    c, id=1000 * index[molecule.name] + c.info["spice_index"]))
    asked = "all" if n_conformations is None else n_conformations
    per_molecule = units[units > 0] * share
    print(f"{split}: {len(molecules)} molecules, {len(confs)} conformations (asked: {asked}; "
          f"{per_molecule.min() if len(per_molecule) else 0}-"
          f"{per_molecule.max() if len(per_molecule) else 0} a molecule"
          + (", high-energy only)" if split == "D0^SPICE" else ", half high-, half low-energy)"))
    return sorted(confs, key=lambda c: c.id)


def check_spice_order(f, molecules):
    """Print how often the first SPICE_N_HIGH conformations of a molecule have the higher
    mean energy: a check of the order data.py's SPICE section relies on, on the real file."""
    n_higher = n_pairs = 0
    for molecule in molecules:
        energy = np.asarray(f[molecule.name]["dft_total_energy"], dtype=np.float64).reshape(-1)
        high, low = data.spice_levels(len(energy))
        if high and low:
            n_pairs += 1
            n_higher += energy[high].mean() > energy[low].mean()
    if n_pairs:
        print(f"check of SPICE's order: conformations 0-{data.SPICE_N_HIGH - 1} have the higher "
              f"mean energy in {100 * n_higher / n_pairs:.1f}% of {n_pairs} molecules")


def write_spice_labels(args, confs):
    """--spice_labels own: the chosen conformations with SPICE's labels, a molecule per
    transaction; molecules already in the db are skipped."""
    elements = {int(z) for c in confs for z in c.numbers}
    atomrefs = {z: e for z, e in data.SPICE_ATOMREFS.items() if z in elements}
    if set(atomrefs) != elements:
        print(f"warning: SPICE lists no free-atom energy for elements "
              f"{sorted(elements - set(atomrefs))}; training fits references by least squares",
              file=sys.stderr)
        atomrefs = None
    db = open_output(args.out, args, atomrefs)
    if "level_note" not in db.metadata:
        db.metadata = {**db.metadata, "level_note": "SPICE's labels (wB97M-D3BJ/def2-TZVPPD, "
                       "Psi4 1.5), not the paper's O_G: label new data at this level"}
    done = finished_ids(db)
    by_molecule = collections.defaultdict(list)
    for c in confs:
        by_molecule[c.id // 1000].append(c)
    n_rows = 0
    for molecule, its in by_molecule.items():
        if any(c.id in done for c in its):
            continue
        with db:                                   # a molecule is one transaction
            for c in its:
                data.write_conformation(db, c, conf_id=c.id, **row_keys(c))
        n_rows += len(its)
    data.rewrite_sorted(args.out, canonical_key)        # the same rows in the same order
    print(f"{args.out}: {args.spice_split}, {n_rows} rows written now, {db.count()} in all")


def make(args):
    if args.spice:
        return make_spice(args)
    # the input first: a bad one must not leave an output db behind
    if args.smiles:
        molecules = read_smiles_file(args.smiles)
        sized = [line for line in molecules
                 if in_size_range(n_atoms_with_hydrogens(line[1]), args)]
        chosen = selected(sized, args)
        report_selection(args, args.smiles, "molecules", len(molecules), len(sized), len(chosen))
        lines = []
        for line in chosen:
            if parse_smiles(line[1]) is None:
                print(f"warning: {args.smiles} line {line[0]}: RDKit cannot parse SMILES "
                      f"{line[1]!r}; skipped", file=sys.stderr)
            else:
                lines.append(line)
        if not lines:
            raise data.DataError(f"{args.smiles}: RDKit can parse none of the {len(chosen)} "
                                 "SMILES taken (the warnings above name them); fix them or "
                                 "take other lines")
    else:
        rows = data.read_db(args.db, verbose=False)[0]
        sized = [c for c in rows if in_size_range(c.n_atoms, args)]
        confs = selected(sized, args)
        report_selection(args, args.db, "rows", len(rows), len(sized), len(confs))
    if args.smiles:
        elements = {a.GetAtomicNum() for _, smi, _ in lines
                    for a in Chem.AddHs(parse_smiles(smi)).GetAtoms()}
    else:
        elements = {int(z) for c in confs for z in c.numbers}
    for path in filter(None, (args.out, args.out_optimal)):
        if os.path.isdir(path):
            raise data.DataError(f"{path} is a directory; --out and --out_optimal name db "
                                 f"files (e.g. {os.path.join(path, 'd0.db')})")
    if args.dask_scheduler:      # fail fast, before any output exists
        oracle_pool.check_dask_scheduler(args.dask_scheduler)
    with ExitStack() as locks:   # one writer per output, for the whole run
        for path in filter(None, (args.out, args.out_optimal)):
            locks.enter_context(safe_io.output_lock(path))
        return label(args, lines if args.smiles else None, None if args.smiles else confs,
                     elements)


def label(args, lines, confs, elements):
    """Label the conformations of `lines` (--smiles) or `confs` (--db), writing each result
    as it arrives. Returns the exit status: 1 if every conformation failed."""
    atomrefs = atomrefs_for(args, elements)
    out = open_output(args.out, args, atomrefs)
    optimal = open_output(args.out_optimal, args, atomrefs) if args.mode == "optimize" else None
    done = finished_ids(optimal if optimal is not None else out)

    def warn(message, n_skipped=0):     # a conformation ETKDG could not embed
        bar.total -= n_skipped
        bar.refresh()
        tqdm.write(message, file=sys.stderr)

    # order: every conf_id of this command in the order jobs start (D_traj-K's head);
    # pending: a lazy stream of the (conf_id, conformation) not finished before
    order, pending, total = conformations_in_order(args, lines, confs, done,
                                                   optimal if optimal is not None else out, warn)
    print(f"{args.mode} with {args.oracle_method}: {total} conformations to do, "
          f"{len(done)} already finished in {args.out_optimal or args.out}")
    bar = safe_io.progress(total=total, unit="conf", desc=args.mode, dynamic_ncols=True)
    tally = Tally(args, out, order, done, bar)
    kind = "optimize" if args.mode == "optimize" else "gradient"

    with ExitStack() as stack:
        stack.callback(bar.close)
        pool, in_flight = None, tally.in_flight       # in_flight: future -> (conf_id, conf)
        while True:
            # keep every worker busy: about two jobs per worker in flight, and none that
            # --max_conformations K leaves no room for (Tally.full)
            window = 2 * pool.n_parallel if pool is not None else 1
            while len(in_flight) < window and not tally.full():
                conf_id, conf = next(pending, (None, None))
                if conf is None:
                    tally.reached = len(order)
                    break
                tally.reached = tally.position[conf_id]
                if args.mode == "mmff":               # D_rdkit: the MMFF minimum is labelled
                    conf = mmff_minimum(args, conf, conf_id, tally)
                    if conf is None:
                        continue
                if pool is None:   # started by the first job: a rerun with nothing to do
                    pool = stack.enter_context(                                # starts none
                        oracle_pool.make_oracle_pool(args, journal_path(args)))
                    window = 2 * pool.n_parallel
                in_flight[pool.submit(conf, conf_id, kind=kind)] = (conf_id, conf)
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:                   # each written the moment it arrives
                conf_id, conf = in_flight.pop(future)
                tally.record(conf, conf_id, future.result(), out, optimal)

    if isinstance(pool, oracle_pool.JournalledPool):
        journal = pool.journal
        print(f"{journal.path}: {journal.n_reused} oracle results read again, "
              f"{journal.n_stored} new ones kept")
    canonical_outputs(args, out, optimal, tally)
    if args.smiles and args.conformer_selection == "butina":
        remember_butina_selection(args, lines, order)
    return final_report(args, tally, optimal is not None)


# ---------------------------------------------------------------------------------------
# label's helpers: what to do, bookkeeping, and the outputs' final form
# ---------------------------------------------------------------------------------------

def conformations_in_order(args, lines, confs, done, db, warn):
    """(order, pending, total): every conf_id of this command in the order its jobs start,
    a lazy stream of the (conf_id, Conformation) not in `done`, and how many those are."""
    if args.smiles and args.conformer_selection == "butina":
        # a finished run of these lines recorded their centroids' conf_ids in `db`: if all
        # are done, nothing needs embedding and clustering again (minutes for a D0 of 900
        # molecules)
        known = db.metadata.get("butina_selection", {})
        lines_key = [line for line, _, _ in lines]
        if known.get("lines") == lines_key and set(known["conf_ids"]) <= done:
            selection, order = [], list(known["conf_ids"])
        else:
            selection = list(butina_conformations(args, lines))
            order = [conf_id for conf_id, _ in selection]
        pending = [(conf_id, c) for conf_id, c in selection if conf_id not in done]
        return order, iter(pending), len(pending)
    if args.smiles:
        n = args.conformers_per_molecule
        order = [(line - 1) * n + k for line, _, _ in lines for k in range(n)]
        total = sum(conf_id not in done for conf_id in order)
        return order, smiles_conformations(args, lines, done, warn), total
    if args.shuffle:
        confs = [confs[i] for i in np.random.default_rng(args.seed).permutation(len(confs))]
    order = [c.id for c in confs]
    confs = [c for c in confs if c.id not in done]
    return order, ((c.id, c) for c in confs), len(confs)


class Tally:
    """label's bookkeeping: rows per conf_id in --out, failures by reason, the jobs in
    flight, and how far down `order` jobs were taken (D_traj-K is its head)."""

    def __init__(self, args, out, order, done, bar):
        self.args, self.bar, self.order = args, bar, order
        self.position = {conf_id: i for i, conf_id in enumerate(order)}
        self.failures_path = args.out + ".failures.jsonl"
        self.reasons = collections.Counter()          # failure reason -> count
        self.n_done, self.n_rows = 0, out.count()
        self.rows_of = collections.Counter(row.get("conf_id")
                                           for row in out.select(include_data=False))
        self.in_flight = {}                           # future -> (conf_id, conf)
        self.reached = -1                             # position of the last conf_id taken
        while self.reached + 1 < len(order) and order[self.reached + 1] in done:
            self.reached += 1                         # a resume: the head finished before

    def room(self):
        """Rows --out may still take: None without --max_conformations."""
        k = self.args.max_conformations
        return None if k is None else k - self.n_rows

    def head_rows(self):
        """Rows of --out from the head of `order` whose jobs are all over (taken from
        pending, not in flight): D_traj-K is the first K of them, whatever arrives when."""
        running = {conf_id for conf_id, _ in self.in_flight.values()}
        n = 0
        for i, conf_id in enumerate(self.order):
            if i > self.reached or conf_id in running:
                break
            n += self.rows_of[conf_id]
        return n

    def full(self):
        """No job may start: with --max_conformations K, in single_point and mmff modes (one
        row per job) the jobs in flight fill the room left; in optimize mode the finished
        head of `order` holds K steps. Optimizations running then still finish: their optima
        go to --out_optimal, their steps to --out until the cut at the end."""
        if self.args.max_conformations is None:
            return False
        if self.args.mode == "optimize":
            return self.head_rows() >= self.args.max_conformations
        return self.room() <= len(self.in_flight)

    def record(self, conf, conf_id, result, out, optimal):
        """One oracle result: written to the outputs, counted, a failure logged."""
        added = write_result(self.args, out, optimal, conf, conf_id, result,
                             None if self.args.mode == "optimize" else self.room())
        self.n_rows += added
        self.rows_of[conf_id] += added
        if result.ok:
            self.n_done += 1
        else:
            self.failed(conf, conf_id, result.reason, result)
        self.bar.update(1)

    def failed(self, conf, conf_id, reason, result=None):
        log_failure(self.failures_path, conf, conf_id, self.args.mode, reason, result)
        self.reasons[reason[:100]] += 1
        self.bar.set_postfix(failed=sum(self.reasons.values()), refresh=False)


def mmff_minimum(args, conf, conf_id, tally):
    """--mode mmff: conf at its MMFF94 minimum, or None (logged as a failure) if RDKit has
    no MMFF types for it or the minimization does not converge in --mmff_max_iters."""
    try:
        positions, converged = oracles.mmff_minimize_checked(conf, args.mmff_max_iters)
    except data.DataError as err:
        tally.failed(conf, conf_id, f"MMFF: {err}")
        tally.bar.update(1)
        return None
    if not converged:
        tally.failed(conf, conf_id, f"MMFF did not converge in {args.mmff_max_iters} "
                                    "iterations (--mmff_max_iters)")
        tally.bar.update(1)
        return None
    return dataclasses.replace(conf, positions=positions)


def canonical_outputs(args, out, optimal, tally):
    """D_traj-K cut at exactly K rows of the head of `order`, then every output db sorted
    by (conf_id, step), whatever order the results arrived in."""
    if args.mode == "optimize" and args.max_conformations is not None:
        end = len(tally.order)
        rows = sorted(out.select(include_data=False),
                      key=lambda row: (tally.position.get(row.get("conf_id"), end),
                                       row.get("step", 0), row.id))
        extra = [row.id for row in rows[args.max_conformations:]]
        if extra:
            out.delete(extra)
        tally.n_rows = len(rows) - len(extra)
    data.rewrite_sorted(args.out, canonical_key)
    if optimal is not None:
        data.rewrite_sorted(args.out_optimal, canonical_key)


def remember_butina_selection(args, lines, order):
    """Once every centroid of these lines is finished, record their conf_ids in the
    (rewritten) output, so that a rerun need not embed and cluster them again."""
    finished = ase.db.connect(args.out_optimal or args.out, type="db")
    if set(order) <= finished_ids(finished):
        lines_key = [line for line, _, _ in lines]
        finished.metadata = {**finished.metadata,
                             "butina_selection": {"lines": lines_key, "conf_ids": order}}


def final_report(args, tally, with_optimal):
    """What was labelled and why the rest failed; the exit status (1: nothing labelled)."""
    print(f"{tally.n_done} conformations finished, {tally.n_rows} rows in {args.out}"
          + (f", starts and optima in {args.out_optimal}" if with_optimal else ""))
    reasons = tally.reasons
    if reasons:
        n_permanent = sum(n for reason, n in reasons.items() if oracle_pool.is_permanent(reason))
        print(f"{sum(reasons.values())} failed (logged in {tally.failures_path}):")
        for reason, count in reasons.most_common():
            print(f"  {count} x {reason}" + ("  [will repeat: not retried]"
                                              if oracle_pool.is_permanent(reason) else ""))
        if n_permanent:
            print(f"{n_permanent} will fail again with these flags: check --oracle_method "
                  "(method and basis) and the elements of the input")
        if n_permanent < sum(reasons.values()):
            print("rerun the same command to retry the others")
    if reasons and tally.n_done == 0:
        print(f"error: every one of the {sum(reasons.values())} conformations failed; "
              "nothing was labelled (the reasons are above)", file=sys.stderr)
        return 1
    return 0


def written_so_far(args):
    """What a stopped run leaves, for its one line: every finished result, in its outputs
    and the oracle journal."""
    outputs = [path for path in (args.out, args.out_optimal, args.out_test) if path]
    if args.spice and args.spice_labels == "own":                   # no oracle
        return f"every finished result is in {', '.join(outputs)}"
    journals = dict.fromkeys(journal_path(argparse.Namespace(**{**vars(args), "out": path}))
                             for path in (args.out, args.out_test) if path)
    return (f"every finished result is in {', '.join(outputs)} and the oracle journal "
            f"{', '.join(journals)}")


def main(argv=None):
    args = parse_args(argv)
    command = safe_io.continue_command(      # this command line (main(argv): this file + argv)
        argv=None if argv is None else [__file__, *map(str, argv)])
    try:
        with safe_io.StopSignals():      # SIGTERM, Ctrl-C: Interrupted, wherever it runs
            return make(args)
    except (data.DataError, oracles.OracleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except safe_io.Interrupted as stop:  # every result is written as it arrives
        print(safe_io.stopped_line(stop, written_so_far(args), command), file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
