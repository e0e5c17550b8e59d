"""Stage 4: the paper's evaluation of an NNP as an optimizer (Eq. 4-8, Tables 1-4, Figs 1-3).

    python evaluate.py --checkpoint runs/golf/checkpoint.pt --db D_test.db --out_dir runs/eval_golf
    python evaluate.py --model rdkit --db D_test.db --out_dir runs/eval_rdkit      (RDKit row)
    python evaluate.py --model external --positions other.db --db D_test.db --out_dir ...
        (any method's final conformations, e.g. Table 2's TD / ConfOpt / Uni-Mol+ rows)
    python evaluate.py --task prediction --checkpoint ... --db labelled.db --out_dir ...
    python evaluate.py --task table --summaries runs/eval_*/summary.json --figures runs/figs
                                                     (Table 2; Figs 1-3 with every model)
    python evaluate.py --task page --evaluations runs/eval_a runs/eval_b --names A B \\
        --out page.html                              (App. H: the methods side by side)

For every test conformation s (rows carry `optimal_energy`, the DFT minimum E_opt): the NNP
optimizes s_0 .. s_T in batches, and the genuine oracle labels s_t at the eval steps
(E_0 from the db when the row has an energy). metrics.py scores E_t = E^DFT(s_t): pct
(Eq. 4), E_res (Eq. 6), pct_div (E_t > E_0, or no E_t, or no E_0), pct_success (Eq. 8),
per step as Sec. 6 (Fig. 3), with 95 % percentile bootstrap intervals over conformations,
and COV / MAT (Appendix F) on this module's symmetry-aware RMSD. A row whose reference
optimization did not converge (key converged False) is not scored, only counted.

Outputs in --out_dir: per_conformation.jsonl (a conformation's record, appended when its
last oracle result is in), final.db (its s_T), summary.json, Figs 1-3, conformations.html,
and oracle_journal.sqlite (--oracle_journal names another): every successful oracle result,
keyed by its question, on disk the moment it arrives. A rerun of the same command evaluates
only the conformations without a record, and reads any oracle result it asks again from the
journal. SIGTERM (a scheduler's) or Ctrl-C stops at once: the oracle workers end, one line
names what is written and the command to continue (the same command); exit status 143
(SIGTERM) or 130 (Ctrl-C). Bad input: one `error:` line, exit status 2.
"""
import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from concurrent.futures import as_completed

import numpy as np
import torch

import data
import metrics
import optimizers
import oracle_pool
import oracles
import painn
import relaxation
import report
import safe_io
from train_baseline import add_compile_arg, prediction_errors

EVAL_STEPS = "1,2,3,5,8,13,21,30,50,75,100"


# ---------------------------------------------------------------------------------------
# RMSD for COV / MAT (App. F; the metrics themselves: metrics.py)
# ---------------------------------------------------------------------------------------

def best_rmsd(conf_a_positions, conf_b_positions, smiles, numbers):
    """Symmetry-aware RMSD (RDKit GetBestRMS, the paper's GetBestRMSD) of two conformations
    of one molecule, on heavy atoms (as GeoDiff's COV/MAT); both on the graph of the SMILES
    (or, without one, the bonds perceived at conformation a)."""
    mol = oracles.rdkit_molecule(data.Conformation(numbers=numbers, positions=conf_a_positions,
                                                   smiles=smiles))
    return best_rmsd_of_graphs(mol, conf_a_positions, mol, conf_b_positions)


def best_rmsd_of_graphs(mol_a, positions_a, mol_b, positions_b):
    """GetBestRMS of mol_a at positions_a and mol_b at positions_b (RDKit molecules with
    hydrogens, atoms in the order of their positions [n_atoms, 3]; the two may order the
    atoms of one molecule differently). Each geometry rides on its own row's graph, so an
    exploded NNP geometry gets a large RMSD, not a failed bond perception."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    mols = []
    for mol, positions in ((mol_a, positions_a), (mol_b, positions_b)):
        mol = Chem.Mol(mol)
        conformer = mol.GetConformer()
        for i, (x, y, z) in enumerate(np.asarray(positions, dtype=np.float64)):
            conformer.SetAtomPosition(i, (float(x), float(y), float(z)))
        mols.append(Chem.RemoveHs(mol))
    return AllChem.GetBestRMS(mols[0], mols[1])


def molecule_identity(conf):
    """COV/MAT's molecule of a test row, and its graph: (key, RDKit molecule with
    hydrogens). The row's SMILES; without one, the canonical SMILES (no stereo) of the
    bonds RDKit's rdDetermineBonds perceives at the DFT optimum (neutral molecule), so two
    isomers of one formula are two molecules. (None, None) if perception fails."""
    from rdkit import Chem
    try:
        mol = oracles.rdkit_molecule(data.Conformation(
            numbers=conf.numbers, positions=conf.optimal_positions, smiles=conf.smiles,
            id=conf.id))
    except data.DataError:
        return None, None
    if conf.smiles:
        return conf.smiles, mol
    return "perceived:" + Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False), mol


# ---------------------------------------------------------------------------------------
# NNP-optimization of the test conformations
# ---------------------------------------------------------------------------------------

def nnp_optimize(model, confs, args, eval_steps):
    """Optimize every conformation for T steps with the NNP (Eq. 3), --batch_size at once in
    the slots of one relaxation.Relaxation, refilled together as they end together.
    Yields (conf, {t: positions [n_atoms, 3]}, {t: (E_nnp Hartree, F_nnp [n_atoms, 3])}) with
    t over eval_steps (and 0): NNP energy and forces at exactly the geometry DFT will see."""
    model.eval()
    engine = relaxation.Relaxation(model, args, args.batch_size)
    for start in range(0, len(confs), args.batch_size):
        chunk = confs[start:start + args.batch_size]
        for k in range(args.batch_size):
            if k < len(chunk):
                engine.fill(k, chunk[k].numbers, chunk[k].positions)       # s_0
            else:
                engine.empty(k)
        snapshots = [dict() for _ in chunk]
        nnp = [dict() for _ in chunk]

        def snapshot(t):
            energy, forces = engine.evaluate()                             # at s_t
            for k in range(len(chunk)):
                snapshots[k][t] = engine.positions(k)
                nnp[k][t] = (float(energy[k]), engine.slot_rows(forces, k))

        snapshot(0)
        for t in range(1, max(eval_steps) + 1):
            engine.step()                                                  # s_t -> s_{t+1}
            if t in eval_steps:
                snapshot(t)
        for k, conf in enumerate(chunk):
            yield conf, snapshots[k], nnp[k]


def conf_key(conf):
    return int(conf.id)


def read_external_positions(path, confs, db_path):
    """--model external: {test row id: positions [n_atoms, 3] Angstrom} of the final
    conformations another method produced. A row of `path` names its test row by its
    `conf_id` key (the row id in --db, as in our final.db), or, without that key, by its own
    row id. Every test row needs exactly one conformation with its atoms in its order."""
    rows, _ = data.read_db(path, "total", verbose=False)
    by_id = {conf_key(c): c for c in confs}
    positions = {}
    for row in rows:
        key = int(row.info["conf_id"]) if "conf_id" in row.info else int(row.id)
        if key in positions:
            raise data.DataError(f"{path}, row {row.id}: a second conformation for test row "
                                 f"{key}; keep one final conformation per test row")
        if key not in by_id:
            raise data.DataError(f"{path}, row {row.id}: conf_id {key} is no row of {db_path}; "
                                 "conf_id must be the id of the test row it optimizes")
        if not np.array_equal(row.numbers, by_id[key].numbers):
            raise data.DataError(f"{path}, row {row.id}: its atoms are not those of test row "
                                 f"{key} of {db_path} in the same order; write them in the "
                                 "test row's atom order")
        positions[key] = row.positions
    missing = sorted(set(by_id) - set(positions))
    if missing:
        raise data.DataError(f"{path}: no conformation for {len(missing)} of {len(by_id)} test "
                             f"rows of {db_path} (row ids {missing[:5]}"
                             f"{', ...' if len(missing) > 5 else ''}); add rows with conf_id = "
                             "the test row id, or evaluate a test db of only the rows it has")
    return positions


def evaluate_optimization(args):
    eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if int(s) <= args.timelimit_eval}
                        | {args.timelimit_eval})
    confs, _ = data.read_db(args.db, args.energy_kind)
    missing = [c.id for c in confs if c.optimal_energy is None]
    if missing:
        raise data.DataError(f"{args.db}, row {missing[0]}: no optimal_energy; make the test db "
                             "with make_trajectories.py --mode optimize")
    if args.model == "external":     # checked before anything is written
        external = read_external_positions(args.positions, confs, args.db)
    records_path = os.path.join(args.out_dir, "per_conformation.jsonl")
    done = set()
    if os.path.exists(records_path):
        records = read_records(records_path)
        check_records_match(records, confs, records_path, args.db)
        done = {r["conf_id"] for r in records}
        safe_io.cut_partial_line(records_path)          # what a kill mid-write left
    todo = [c for c in confs if conf_key(c) not in done
            and bool(c.info.get("converged", True))]     # unconverged E_opt: not scored
    print(f"{len(confs)} test conformations, {len(done)} done before, {len(todo)} to evaluate")
    # one NNP batch: its oracle jobs start after it, never beside it, so it takes every core
    torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(
        args, pool_idle=len(todo) <= args.batch_size))
    final_db = data.connect_for_writing(os.path.join(args.out_dir, "final.db"))

    if args.model == "rdkit":
        steps_of = []
        with safe_io.progress(todo, desc="MMFF minimization") as bar:   # closed at a stop too
            for c in bar:
                positions, converged = oracles.mmff_minimize_checked(c, args.mmff_max_iters)
                c = dataclasses.replace(c, info={**c.info, "mmff_converged": converged})
                steps_of.append((c, {eval_steps[-1]: positions}, {}))
        eval_steps = [eval_steps[-1]]
    elif args.model == "external":   # the genuine oracle at s_T only: no trajectory to score
        steps_of = [(c, {eval_steps[-1]: external[conf_key(c)]}, {}) for c in todo]
        eval_steps = [eval_steps[-1]]
    else:
        model = painn.load_checkpoint(args.checkpoint, args.device).to(getattr(torch, args.dtype))
        if args.compile:
            model.compile_network()
        steps_of = nnp_optimize(model, todo, args, set(eval_steps))

    with oracle_pool.make_oracle_pool(args, journal_path(args)) as pool, \
            safe_io.progress(total=len(todo), desc="oracle at eval steps") as bar:
        jobs = {}                       # future -> (conf id, t), not finished yet
        pending = {}                    # conf id -> [conf, positions, nnp, {t: result}]

        def finish(future):
            """One oracle result in; a conformation with all its results is written at once."""
            key, t = jobs.pop(future)
            entry = pending[key]
            entry[3][t] = future.result()
            if not entry[3][t].ok and oracle_pool.is_permanent(entry[3][t].reason):
                raise oracles.OracleError(
                    f"the oracle cannot label conformation {key} of {args.db} "
                    f"({entry[3][t].reason[:200]}); it will fail again: check --oracle_method "
                    "(method and basis) and the elements of the db")
            if len(entry[3]) == len(eval_steps) + (entry[0].energy is None):
                record = conformation_record(*entry, eval_steps)
                conf, positions = entry[0], entry[1]
                final = data.Conformation(numbers=conf.numbers, positions=positions[eval_steps[-1]],
                                          energy=record["energy_dft"][-1], smiles=conf.smiles)
                # the record is the one mark of 'done', written last; the final.db row of
                # a run killed before its record is replaced, never doubled
                with final_db:
                    final_db.delete([row.id for row in final_db.select(conf_id=key)])
                    data.write_conformation(final_db, final, conf_id=key)
                safe_io.append_jsonl(records_path, record)     # appended as it finishes
                del pending[key]
                bar.update(1)

        for conf, positions, nnp in steps_of:   # a batch of NNP optimizations at a time
            pending[conf_key(conf)] = [conf, positions, nnp, {}]
            steps_needed = eval_steps + ([0] if conf.energy is None else [])
            for t in steps_needed:
                job = data.Conformation(numbers=conf.numbers, positions=positions.get(t, conf.positions),
                                        smiles=conf.smiles)
                jobs[pool.submit(job, conf_key(conf) * 1000 + t)] = (conf_key(conf), t)
            for future in [f for f in jobs if f.done()]:   # records of earlier batches now:
                finish(future)                             # a kill loses one batch at most
        for future in as_completed(list(jobs)):
            finish(future)
    if isinstance(pool, oracle_pool.JournalledPool):
        print(f"{pool.journal.path}: {pool.journal.n_reused} oracle results read again, "
              f"{pool.journal.n_stored} new ones kept")
    return summarize(args, read_records(records_path), {c.id: c for c in confs})


def conformation_record(conf, positions, nnp, results, eval_steps):
    """Everything measured for one conformation (energies in Hartree, MSEs in kcal/mol)."""
    if conf.energy is not None:
        e0 = conf.energy
    else:
        e0 = results[0].energy if results[0].ok else None
    energy_dft, energy_mse, forces_mse, failures = [], [], [], []
    for t in eval_steps:
        r = results[t]
        if not r.ok:
            failures.append({"step": t, "reason": r.reason})
        energy_dft.append(r.energy if r.ok else None)
        if r.ok and t in nnp:   # the NNP and DFT at the same geometry (Figure 1)
            e_nnp, f_nnp = nnp[t]
            energy_mse.append(((e_nnp - r.energy) * data.HARTREE_TO_KCAL) ** 2)
            forces_mse.append(float((((f_nnp - r.forces) * data.HARTREE_TO_KCAL) ** 2).mean()))
        else:
            energy_mse.append(None)
            forces_mse.append(None)
    return {"conf_id": conf_key(conf), "smiles": conf.smiles, "n_atoms": conf.n_atoms,
            "e0": e0, "e_opt": conf.optimal_energy, "steps": eval_steps,
            "energy_dft": energy_dft, "energy_mse_kcal_mol2": energy_mse,
            "forces_mse_kcal_mol_A2": forces_mse, "failures": failures,
            **({"mmff_converged": conf.info["mmff_converged"]}        # the RDKit row
               if "mmff_converged" in conf.info else {})}


def check_records_match(records, confs, records_path, db_path):
    """Records name test rows by row id: a record whose row now holds another molecule (the
    db was remade, reordered or replaced since) must not be resumed or scored."""
    by_id = {conf_key(c): c for c in confs}
    for r in records:
        c = by_id.get(r["conf_id"])
        if c is None or (c.smiles, c.n_atoms) != (r.get("smiles"), r.get("n_atoms")):
            now = "no such row" if c is None else f"{c.smiles} ({c.n_atoms} atoms)"
            raise data.DataError(
                f"{records_path}: row {r['conf_id']} was {r.get('smiles')} ({r.get('n_atoms')} "
                f"atoms), but in {db_path} it is {now}: the test db changed since this "
                "evaluation; evaluate into a new --out_dir")


def read_records(path):
    """The per-conformation records (a partial last line of a killed run is dropped)."""
    return safe_io.read_jsonl(path)


def summarize(args, records, confs_by_id):
    """summary.json from the per-conformation records (so a rerun recomputes it exactly).
    Rows whose reference optimization did not converge (converged False, App. E) are not
    scored, only counted; rows without the key are scored."""
    records = sorted(records, key=lambda r: r["conf_id"])    # the jsonl is in finishing order
    unconverged = {i for i, c in confs_by_id.items() if not bool(c.info.get("converged", True))}
    records = [r for r in records if r["conf_id"] not in unconverged]
    steps = records[0]["steps"] if records else []
    nan = float("nan")
    e0 = np.array([nan if r["e0"] is None else r["e0"] for r in records])           # [n]
    e_opt = np.array([r["e_opt"] for r in records])                                   # [n]
    e_steps = np.array([[nan if e is None else e for e in r["energy_dft"]] for r in records],
                       dtype=np.float64).reshape(len(records), len(steps))         # [n, n_steps]
    per_step = metrics.aggregate_steps(e0, e_steps, e_opt)                  # Fig. 3, Sec. 6
    final = per_step[-1] if per_step else metrics.aggregate([], [], [])     # Table 2
    e_T = e_steps[:, -1] if len(steps) else np.zeros(0)
    intervals = metrics.bootstrap_interval(
        (e0, e_T, e_opt),
        lambda *cols: {k: metrics.aggregate(*cols)[k] for k in metrics.INTERVAL_METRICS},
        args.n_bootstrap, seed=args.bootstrap_seed) if records else {}
    kept = ~metrics.diverged(e0, e_T)                                       # [n]

    def mse_stats(key, i):
        v = np.array([r[key][i] for r in records if r[key][i] is not None])
        if not len(v):
            return {"mean": None, "p10": None, "p50": None, "p90": None}
        return {"mean": float(v.mean()),
                **{f"p{q}": float(np.percentile(v, q)) for q in (10, 50, 90)}}

    model_name = {"nnp": args.checkpoint, "rdkit": "rdkit"}.get(args.model)
    summary = {"model": model_name or f"external:{args.positions}", "name": method_name(args),
               "oracle_method": getattr(args, "oracle_method", None),
               "db": args.db, "n_conformations": len(records),
               "n_unconverged_reference": len(unconverged),   # not scored (not in n)
               "n_no_e0": final["n_no_e0"],                 # oracle failed at s_0: diverged
               "n_failed_oracle": sum(1 for r in records if r["failures"]),   # at any step
               "n_failed_oracle_T": final["n_failed"],      # at s_T: counted in pct_div
               **{k: final[k] for k in metrics.STEP_METRICS},
               **{f"{k}_ci95": [None if np.isnan(x) else x for x in intervals[k]]
                  for k in intervals},
               "bootstrap": {"method": "percentile interval, resampling conformations",
                             "n_resamples": args.n_bootstrap, "seed": args.bootstrap_seed,
                             "level": 95.0},
               "steps": steps}
    if args.model == "rdkit":
        summary["n_mmff_unconverged"] = sum(r.get("mmff_converged") is False for r in records)
        summary["mmff_max_iters"] = args.mmff_max_iters
    for key in metrics.STEP_METRICS + ("pct_p10", "pct_p50", "pct_p90", "n_failed"):
        summary[f"{key}_per_step"] = [s[key] for s in per_step]
    # Figure 2's violin: pct_T of every conformation that did not diverge at T
    summary["pct_T_values"] = [float(x) for x in
                               metrics.pct_of_optimization(e0[kept], e_T[kept], e_opt[kept])]
    summary["energy_mse_kcal_mol2_per_step"] = [mse_stats("energy_mse_kcal_mol2", i)
                                                for i in range(len(steps))]
    summary["forces_mse_kcal_mol_A2_per_step"] = [mse_stats("forces_mse_kcal_mol_A2", i)
                                                  for i in range(len(steps))]
    summary.update(cov_mat(args, records, confs_by_id))
    return summary


def cov_mat(args, records, confs_by_id):
    """COV / MAT over molecules (molecule_identity), from final.db's conformations and
    optimal_positions."""
    refs = [confs_by_id.get(r["conf_id"]) for r in records]
    if not records or any(c is None or c.optimal_positions is None for c in refs):
        return {"cov": None, "mat": None,
                "cov_mat_note": "left out: the test db has no optimal_positions"}
    finals, _ = data.read_db(os.path.join(args.out_dir, "final.db"), "total", verbose=False)
    final_by_id = {int(c.info["conf_id"]): c.positions for c in finals}
    by_molecule = defaultdict(list)       # key -> [(graph, NNP-optimized, DFT-optimal)]
    n_unidentified = 0
    for r, c in zip(records, refs):
        key, mol = molecule_identity(c)
        if key is None:
            n_unidentified += 1
            continue
        by_molecule[key].append((mol, final_by_id[r["conf_id"]], c.optimal_positions))
    covs, mats = [], []
    for key in sorted(by_molecule):
        rows = by_molecule[key]
        gen = [(mol, g) for mol, g, _ in rows]
        ref = [(mol, o) for mol, _, o in rows]
        rmsd = lambda a, b: best_rmsd_of_graphs(*a, *b)   # noqa: E731
        cov, mat = metrics.coverage_and_matching(gen, ref, rmsd, args.cov_delta)
        covs.append(cov)
        mats.append(mat)
    identity = ("SMILES key" if all(c.smiles for c in refs) else
                "SMILES key, else canonical SMILES of bonds perceived at the DFT optimum "
                "(RDKit rdDetermineBonds, no stereo)")
    return {"cov": float(np.mean(covs)) if covs else None,
            "mat": float(np.mean(mats)) if mats else None, "cov_delta": args.cov_delta,
            "n_molecules": len(by_molecule), "molecule_identity": identity,
            "n_cov_mat_unidentified": n_unidentified}   # no SMILES, bonds not perceived


# ---------------------------------------------------------------------------------------
# Per-conformation energies, for the paper's claims (report.check_claims)
# ---------------------------------------------------------------------------------------

def scored_energies(summary_path):
    """{conf_id: (E_0, E_T, E_opt)} (Hartree, NaN where the oracle gave none) of one
    evaluation, from the per_conformation.jsonl beside its summary.json; the rows
    summary.json scored."""
    summary = json.load(open(summary_path))
    records = read_records(os.path.join(os.path.dirname(summary_path), "per_conformation.jsonl"))
    if summary.get("n_unconverged_reference"):    # not scored: see summarize
        confs, _ = data.read_db(summary["db"], verbose=False)
        unconverged = {conf_key(c) for c in confs if not bool(c.info.get("converged", True))}
        records = [r for r in records if r["conf_id"] not in unconverged]
    nan = float("nan")
    return {r["conf_id"]: tuple(nan if e is None else float(e)
                                for e in (r["e0"], r["energy_dft"][-1], r["e_opt"]))
            for r in records}


def method_name(args):
    """The method's name in tables and pages: --name, else the checkpoint's file name
    (its folder for our checkpoint.pt), RDKit (MMFF), or the --positions file's name."""
    if getattr(args, "name", None):
        return args.name
    if args.model == "rdkit":
        return "RDKit (MMFF)"
    path = args.checkpoint if args.model == "nnp" else args.positions
    stem = os.path.basename(path).split(".")[0]
    return (os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
            if stem == "checkpoint" else stem)


def final_panel_title(model, name, steps):
    """A method's s_T in the page: what moved it there."""
    if model == "rdkit":
        return f"{name}: MMFF minimum"
    if model == "external":
        return f"{name}: final conformation"
    return f"{name}: NNP-optimized s_{steps[-1]}"


def page_rows(confs_by_id, conf_ids, evaluations):
    """report.conformation_row of each conformation of conf_ids; evaluations: (title,
    {conf_id: record}, {conf_id: s_T positions}) of each method, side by side."""
    rows = []
    for conf_id in conf_ids:
        c = confs_by_id[conf_id]
        rmsd = lambda x, c=c: best_rmsd(x, c.optimal_positions, c.smiles, c.numbers)  # noqa: E731
        e0 = next((records[conf_id]["e0"] for _, records, _ in evaluations
                   if records[conf_id]["e0"] is not None), None)
        finals = [(title, positions[conf_id], records[conf_id]["energy_dft"][-1])
                  for title, records, positions in evaluations]
        rows.append(report.conformation_row(c, e0, finals, rmsd))
    return rows


def final_positions(out_dir):
    """{conf_id: s_T positions [n_atoms, 3]} of an evaluation's final.db."""
    finals, _ = data.read_db(os.path.join(out_dir, "final.db"), "total", verbose=False)
    return {int(c.info["conf_id"]): c.positions for c in finals}


def write_page(args, records):
    """conformations.html (Appendix H): s_0, s_T and the DFT optimum in 3D, for the first
    --page_conformations test conformations (by conf_id) that have optimal_positions."""
    confs, _ = data.read_db(args.db, args.energy_kind, verbose=False)
    by_id = {c.id: c for c in confs}
    chosen = [r["conf_id"] for r in sorted(records, key=lambda r: r["conf_id"])
              if by_id[r["conf_id"]].optimal_positions is not None][:args.page_conformations]
    if not chosen:
        return
    name = method_name(args)
    title = final_panel_title(args.model, name, records[0]["steps"])
    rows = page_rows(by_id, chosen, [(title, {r["conf_id"]: r for r in records},
                                      final_positions(args.out_dir))])
    path = os.path.join(args.out_dir, "conformations.html")
    report.write_conformations_page(path, rows, f"{name} on {args.db}: test conformations",
                                    methods=f"{name}'s final conformation s_T")
    print(f"page: {path}")


def write_comparison_page(args):
    """--task page (Appendix H, Fig. 5): several evaluations of one test db side by side,
    for the first --page_conformations conformations (by conf_id) every one of them scored."""
    evaluations, db = [], None
    names = args.names or [None] * len(args.evaluations)
    if len(names) != len(args.evaluations):
        raise data.DataError("--task page needs as many --names as --evaluations")
    for out_dir, name in zip(args.evaluations, names):
        try:
            summary = json.load(open(os.path.join(out_dir, "summary.json")))
        except (OSError, ValueError) as err:
            raise data.DataError(f"{out_dir}: no readable summary.json ({err}); run "
                                 "evaluate.py --task optimization into it first") from None
        if db is not None and os.path.abspath(summary["db"]) != os.path.abspath(db):
            raise data.DataError(f"{out_dir} evaluated {summary['db']}, not {db}: a page "
                                 "compares evaluations of one test db")
        db = summary["db"]
        records = {r["conf_id"]: r for r in read_records(
            os.path.join(out_dir, "per_conformation.jsonl"))}
        name = name or summary.get("name") or os.path.basename(os.path.normpath(out_dir))
        model = ("rdkit" if summary["model"] == "rdkit" else
                 "external" if str(summary["model"]).startswith("external:") else "nnp")
        steps = next(iter(records.values()))["steps"] if records else [0]
        evaluations.append((final_panel_title(model, name, steps), records,
                            final_positions(out_dir), name))
    confs, _ = data.read_db(args.db or db, args.energy_kind, verbose=False)
    for (_, records, _, name), out_dir in zip(evaluations, args.evaluations):
        check_records_match(list(records.values()), confs, out_dir, args.db or db)
    by_id = {c.id: c for c in confs}
    common = set.intersection(*(set(records) for _, records, _, _ in evaluations))
    chosen = [i for i in sorted(common) if by_id[i].optimal_positions is not None
              and all(records[i]["e0"] is not None for _, records, _, _ in evaluations)]
    chosen = chosen[:args.page_conformations]
    if not chosen:
        raise data.DataError("the evaluations share no scored conformation with "
                             "optimal_positions")
    rows = page_rows(by_id, chosen, [e[:3] for e in evaluations])
    names = [e[3] for e in evaluations]
    report.write_conformations_page(args.out, rows,
                                    f"{', '.join(names)} on {args.db or db}: test conformations",
                                    methods=f"each method's final conformation s_T "
                                            f"({', '.join(names)})")
    print(f"page: {args.out} ({len(rows)} conformations, {len(names)} methods)")


# ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("optimization", "prediction", "table", "page"),
                   default="optimization")
    p.add_argument("--name", help="the method's name in tables and pages (default: the "
                                  "checkpoint's file name, RDKit (MMFF), or the --positions "
                                  "file's name for --model external)")
    p.add_argument("--checkpoint", help="our checkpoint.pt or an official NNP_checkpoint_actor")
    p.add_argument("--model", choices=("nnp", "rdkit", "external"), default="nnp",
                   help="rdkit: the paper's RDKit row (MMFF minimization, then the oracle); "
                        "external: the final conformations in --positions")
    p.add_argument("--positions", help="--model external: ASE db of another method's final "
                                       "conformations, one per test row, key conf_id = the "
                                       "test row's id in --db")
    p.add_argument("--db", help="test db: rows with optimal_energy (and optimal_positions)")
    p.add_argument("--out_dir", help="summary.json, per_conformation.jsonl, final.db, plots")
    p.add_argument("--timelimit_eval", type=int, default=100, help="T: NNP-optimization steps")
    p.add_argument("--eval_steps", default=EVAL_STEPS, help="steps where DFT is computed")
    p.add_argument("--batch_size", type=int, default=64, help="molecules per NNP batch")
    p.add_argument("--cov_delta", type=float, default=0.5, help="COV threshold, Angstrom")
    p.add_argument("--mmff_max_iters", type=int, default=oracles.MMFF_MAX_ITERS,
                   help="RDKit row: MMFF iterations (default: %(default)s, as D_rdkit)")
    p.add_argument("--n_bootstrap", type=int, default=2000,
                   help="resamples of the 95 %% bootstrap intervals over conformations")
    p.add_argument("--bootstrap_seed", type=int, default=0)
    p.add_argument("--energy_kind", choices=data.ENERGY_KINDS, default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--page_conformations", type=int, default=4,
                   help="conformations.html shows this many test conformations in 3D (0: none)")
    add_compile_arg(p)
    p.add_argument("--summaries", nargs="+", help="--task table: summary.json files")
    p.add_argument("--names", nargs="+", help="--task table: row names; --task page: method "
                                              "names (default: each summary's name)")
    p.add_argument("--evaluations", nargs="+",
                   help="--task page: evaluate.py --out_dir folders of one test db, shown side "
                        "by side (Appendix H, Fig. 5)")
    p.add_argument("--out", help="--task page: the page to write (e.g. page.html)")
    p.add_argument("--figures", help="--task table: folder for Figures 1-3 of all the summaries")
    p.add_argument("--claims", nargs=5, metavar="NAME",
                   help="--task table: check the paper's claims 1-5 on the rows named f_baseline "
                        "traj-K traj-20K GOLF-K f_rdkit ('-' if absent); rows of one name are "
                        "seeds")
    p.add_argument("--claim", action="append", default=[], metavar="SPEC",
                   help="--task table: check a claim 'TITLE: A > B; C >= D [@ metric]' (> "
                        "beats, >= matches or beats, @ the metrics it is made in); repeatable")
    p.add_argument("--success_floor", type=float, default=None, metavar="PCT",
                   help="--claims: a pct_success comparison that does not hold while both "
                        "rates are at or below PCT %% is 'not decided' (the scorer's limit, "
                        "benchmarks/nnp_floor.py), not a failure")
    p.add_argument("--claims_only", action="store_true",
                   help="--task table --claims/--claim: print the claims, not the table")
    optimizers.add_optimizer_args(p)
    oracles.add_oracle_args(p, optimize=False)   # the oracle labels; it never optimizes
    return optimizers.parse_args_with_preset(p, argv)   # --optimizer_preset: Table 6


def journal_path(args):
    """The oracle journal: --oracle_journal, else <out_dir>/oracle_journal.sqlite."""
    return args.oracle_journal or os.path.join(args.out_dir, "oracle_journal.sqlite")


def written_so_far(args):
    """What a stopped run leaves, for its one line."""
    if args.task != "optimization":
        return f"nothing (--task {args.task} writes its output at its end)"
    return (f"the record of every finished conformation is in "
            f"{os.path.join(args.out_dir, 'per_conformation.jsonl')}, every finished oracle "
            f"result in the oracle journal {journal_path(args)}")


def main(argv=None):
    args = parse_args(argv)
    command = safe_io.continue_command(      # this command line (main(argv): this file + argv)
        argv=None if argv is None else [__file__, *map(str, argv)])
    try:
        with safe_io.StopSignals():      # SIGTERM, Ctrl-C: Interrupted, wherever it runs
            run_task(args)
    except (data.DataError, painn.CheckpointError, oracles.OracleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except safe_io.Interrupted as stop:  # each record is written as its conformation ends
        print(safe_io.stopped_line(stop, written_so_far(args), command), file=sys.stderr)
        return stop.exit_code
    return 0


def run_task(args):
    if args.task == "table":
        if not args.summaries or (args.names and len(args.names) != len(args.summaries)):
            raise data.DataError("--task table needs --summaries (summary.json files), and as "
                                 "many --names, if given")
        rows = []
        for path in args.summaries:
            try:
                rows.append(json.load(open(path)))
            except (OSError, ValueError) as err:
                raise data.DataError(f"{path}: not a readable summary.json ({err}); run "
                                     "evaluate.py --task optimization first") from None
        names = args.names or [r.get("name") or os.path.basename(os.path.dirname(
            os.path.abspath(p))) for r, p in zip(rows, args.summaries)]
        if not args.claims_only:
            print(report.format_table(list(zip(names, rows))))
        if args.claims or args.claim:
            claims = report.role_claims(args.claims) if args.claims else []
            claims += [(report.parse_claim(spec), None) for spec in args.claim]
            energies = [(name, scored_energies(path)) for name, path in zip(names, args.summaries)]
            print(report.check_claims(energies, claims, args.n_bootstrap, args.bootstrap_seed,
                                      args.success_floor))
        if args.figures:
            report.save_figures(report.draw_figures(list(zip(names, rows))), args.figures)
            print(f"figures: {', '.join(os.path.join(args.figures, f) for f in report.FIGURES)}")
        return
    if args.task == "page":
        if not args.evaluations or not args.out:
            raise data.DataError("--task page needs --evaluations (evaluate.py --out_dir "
                                 "folders) and --out (the page to write)")
        write_comparison_page(args)
        return
    for flag in ("db", "out_dir"):
        if not getattr(args, flag):
            raise data.DataError(f"--{flag} is required for --task {args.task}")
    if args.model == "nnp" and not args.checkpoint:
        raise data.DataError("--checkpoint is required (or --model rdkit)")
    if args.model == "external" and not args.positions:
        raise data.DataError("--model external needs --positions: a db of the method's final "
                             "conformations, key conf_id = the test row id in --db")
    if args.dask_scheduler and args.task == "optimization":   # fail fast, before any output
        oracle_pool.check_dask_scheduler(args.dask_scheduler)
    os.makedirs(args.out_dir, exist_ok=True)
    with safe_io.output_lock(args.out_dir):                    # one writer per out_dir
        evaluate_task(args)


def evaluate_task(args):
    torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(args))
    if args.task == "prediction":
        confs, _ = data.read_db(args.db, args.energy_kind, require_energy=True, require_forces=True)
        model = painn.load_checkpoint(args.checkpoint, args.device).to(getattr(torch, args.dtype))
        if args.compile:
            model.compile_network()
        summary = prediction_errors(model, confs, args.batch_size, args.device,
                                    getattr(torch, args.dtype))
    else:
        summary = evaluate_optimization(args)
        report.plot(summary, args.out_dir)
        print(report.format_table([(os.path.basename(os.path.normpath(args.out_dir)), summary)]))
        print(f"plots: {args.out_dir}/fig1_nnp_error.png, fig2_pct_violin.png, "
              "fig3_pct_over_steps.png")
        if args.page_conformations > 0:
            records = read_records(os.path.join(args.out_dir, "per_conformation.jsonl"))
            write_page(args, [r for r in records if r["e0"] is not None])
    path = os.path.join(args.out_dir, "summary.json")
    with safe_io.atomic_write(path) as tmp, open(tmp, "w") as f:   # a kill keeps the old one
        json.dump(summary, f, indent=1)
    print(f"wrote {args.out_dir}/summary.json")


if __name__ == "__main__":
    sys.exit(main())
