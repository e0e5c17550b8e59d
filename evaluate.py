"""Stage 4: the paper's evaluation of an NNP as an optimizer (Eq. 4-8, Tables 1-4, Figs 1-3).

    python evaluate.py --checkpoint runs/golf/checkpoint.pt --db D_test.db --out_dir runs/eval_golf
    python evaluate.py --model rdkit --db D_test.db --out_dir runs/eval_rdkit      (RDKit row)
    python evaluate.py --task prediction --checkpoint ... --db labelled.db --out_dir ...
    python evaluate.py --task table --summaries runs/eval_*/summary.json           (Table 2)

For every test conformation s (rows carry `optimal_energy`, the DFT minimum E_opt): the NNP
optimizes s_0 .. s_T in batches, and the genuine oracle labels s_t at the eval steps
(E_0 from the db when the row has an energy). Then, with E_t = E^DFT(s_t):
    pct(s_t)   = 100 (E_0 - E_t) / (E_0 - E_opt)             Eq. 4, % of the optimization
    E_res(s_t) = E_t - E_opt                                 Eq. 6, kcal/mol
    diverged   : E_t > E_0 (the optimization made it worse), or the oracle failed at s_t
    success    : E_res(s_t) < 1 kcal/mol                     Eq. 8, chemical accuracy
pct, E_res and success are averaged over the conformations that did not diverge; pct_div is
the share of those that did. COV / MAT (Appendix F): per molecule, the share of DFT-optimal
conformations with an NNP-optimized one within RMSD delta, and the mean smallest RMSD.
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from concurrent.futures import as_completed

import numpy as np
import torch
from tqdm import tqdm

import data
import optimizers
import oracles
import painn
from train_baseline import prediction_errors

EVAL_STEPS = "1,2,3,5,8,13,21,30,50,75,100"


# ---------------------------------------------------------------------------------------
# The metrics (pure functions of energies in Hartree)
# ---------------------------------------------------------------------------------------

def pct_of_optimization(e0, et, e_opt):
    """Eq. 4: percentage of the DFT optimization s_0 -> s_opt the NNP achieved at s_t."""
    return 100.0 * (e0 - et) / (e0 - e_opt)


def residual_energy(et, e_opt):
    """Eq. 6: E_res(s_t) = E_t - E_opt, in kcal/mol."""
    return (et - e_opt) * data.HARTREE_TO_KCAL


def aggregate(e0, et, e_opt):
    """Table 2's numbers for one step over many conformations (arrays of Hartree). Diverged
    conformations count in pct_div only; the others give pct (mean, std), E_res (mean) and
    pct_success. Diverged = E_t > E_0, or no E_t at all (NaN: the oracle failed at s_t,
    which in practice means the SCF did not converge on atoms the NNP pulled apart)."""
    e0, et, e_opt = (np.asarray(x, dtype=np.float64) for x in (e0, et, e_opt))
    failed = ~np.isfinite(et)
    diverged = failed | (et > e0)
    keep = ~diverged
    pct = pct_of_optimization(e0[keep], et[keep], e_opt[keep])
    e_res = residual_energy(et[keep], e_opt[keep])
    n = len(et)
    nan = float("nan")
    return {"n": int(n), "n_failed": int(failed.sum()),
            "pct_mean": float(pct.mean()) if keep.any() else nan,
            "pct_std": float(pct.std()) if keep.any() else nan,
            "pct_div": float(100.0 * diverged.mean()) if n else nan,
            "e_res_mean_kcal_mol": float(e_res.mean()) if keep.any() else nan,
            "pct_success": float(100.0 * (e_res < 1.0).mean()) if keep.any() else nan,
            # the same successes over all n conformations (a diverged one never succeeds)
            "pct_success_all": float(100.0 * (e_res < 1.0).sum() / n) if n else nan}


# aggregate's numbers that summary.json holds at s_T and per eval step
STEP_METRICS = ("pct_mean", "pct_std", "pct_div", "e_res_mean_kcal_mol", "pct_success",
                "pct_success_all")


def best_rmsd(conf_a_positions, conf_b_positions, smiles, numbers):
    """Symmetry-aware RMSD (RDKit GetBestRMS, the paper's GetBestRMSD) of two conformations
    of one molecule, on heavy atoms (as GeoDiff's COV/MAT)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    mols = []
    for positions in (conf_a_positions, conf_b_positions):
        mol = oracles.rdkit_molecule(data.Conformation(numbers=numbers, positions=positions,
                                                       smiles=smiles))
        mols.append(Chem.RemoveHs(mol))
    return AllChem.GetBestRMS(mols[0], mols[1])


def coverage_and_matching(generated, reference, rmsd, delta=0.5):
    """Appendix F for one molecule: COV = share of reference conformations with a generated
    one within RMSD < delta (A); MAT = mean over references of the smallest RMSD."""
    d = np.array([[rmsd(g, r) for g in generated] for r in reference])   # [n_ref, n_gen]
    closest = d.min(axis=1)
    return float(100.0 * (closest < delta).mean()), float(closest.mean())


# ---------------------------------------------------------------------------------------
# NNP-optimization of the test conformations
# ---------------------------------------------------------------------------------------

def nnp_optimize(model, confs, args, eval_steps):
    """Optimize every conformation for T steps with the NNP, in batches of --batch_size.
    Yields (conf, {t: positions [n_atoms, 3]}, {t: (E_nnp Hartree, F_nnp [n_atoms, 3])}) with
    t over eval_steps (and 0): NNP energy and forces at exactly the geometry DFT will see."""
    dtype = getattr(torch, args.dtype)
    model.eval()
    for start in range(0, len(confs), args.batch_size):
        chunk = confs[start:start + args.batch_size]
        b = data.collate(chunk, "cpu", torch.float64)
        opt = optimizers.optimizer_from_args(args, b.positions, b.batch, len(chunk), model_dtype=dtype)
        z = opt.concat_slots([torch.as_tensor(c.numbers) for c in chunk]).to(args.device)

        def energy_and_forces(positions):
            e, f = model(z, positions.to(args.device), opt.batch.to(args.device), opt.n_slots)
            return e.detach().cpu(), f.detach().cpu()

        snapshots = [dict() for _ in chunk]
        nnp = [dict() for _ in chunk]

        def snapshot(t):
            e, f = energy_and_forces(opt.positions.to(dtype))
            for k in range(len(chunk)):
                mask = opt.batch == k
                snapshots[k][t] = opt.slot_positions(k).numpy().copy()
                nnp[k][t] = (float(e[k]), f[mask].double().numpy())

        snapshot(0)
        for t in range(1, max(eval_steps) + 1):
            opt.step(energy_and_forces)
            if t in eval_steps:
                snapshot(t)
        for k, conf in enumerate(chunk):
            yield conf, snapshots[k], nnp[k]


def conf_key(conf):
    return int(conf.id)


def evaluate_optimization(args):
    eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if int(s) <= args.timelimit_eval}
                        | {args.timelimit_eval})
    confs, _ = data.read_db(args.db, args.energy_kind)
    missing = [c.id for c in confs if c.optimal_energy is None]
    if missing:
        raise data.DataError(f"{args.db}, row {missing[0]}: no optimal_energy; make the test db "
                             "with make_trajectories.py --mode optimize")
    records_path = os.path.join(args.out_dir, "per_conformation.jsonl")
    done = set()
    if os.path.exists(records_path):
        done = {r["conf_id"] for r in read_records(records_path)}
        data.cut_partial_line(records_path)          # what a kill mid-write left
    todo = [c for c in confs if conf_key(c) not in done]
    print(f"{len(confs)} test conformations, {len(done)} done before, {len(todo)} to evaluate")
    final_db = data.connect_for_writing(os.path.join(args.out_dir, "final.db"))

    if args.model == "rdkit":
        steps_of = [(c, {eval_steps[-1]: oracles.mmff_minimize(c, args.mmff_max_iters)}, {})
                    for c in tqdm(todo, desc="MMFF minimization")]
        eval_steps = [eval_steps[-1]]
    else:
        model = painn.load_checkpoint(args.checkpoint, args.device).to(getattr(torch, args.dtype))
        steps_of = nnp_optimize(model, todo, args, set(eval_steps))

    with oracles.make_oracle_pool(args) as pool:
        jobs = {}                       # future -> (conf, t)
        pending = {}                    # conf id -> [conf, positions, nnp, {t: result}]
        bar = tqdm(total=len(todo), desc="oracle at eval steps")
        for conf, positions, nnp in steps_of:
            pending[conf_key(conf)] = [conf, positions, nnp, {}]
            steps_needed = eval_steps + ([0] if conf.energy is None else [])
            for t in steps_needed:
                job = data.Conformation(numbers=conf.numbers, positions=positions.get(t, conf.positions),
                                        smiles=conf.smiles)
                jobs[pool.submit(job, conf_key(conf) * 1000 + t)] = (conf_key(conf), t)
        for future in as_completed(jobs):
            key, t = jobs[future]
            entry = pending[key]
            entry[3][t] = future.result()
            if not entry[3][t].ok and oracles.is_permanent(entry[3][t].reason):
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
                data.append_jsonl(records_path, record)     # appended as it finishes
                del pending[key]
                bar.update(1)
        bar.close()
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
            "forces_mse_kcal_mol_A2": forces_mse, "failures": failures}


def read_records(path):
    """The per-conformation records (a partial last line of a killed run is dropped)."""
    return data.read_jsonl(path)


def summarize(args, records, confs_by_id):
    """summary.json from the per-conformation records (so a rerun recomputes it exactly)."""
    records = [r for r in records if r["e0"] is not None]
    steps = records[0]["steps"] if records else []

    def column(i):
        return np.array([np.nan if r["energy_dft"][i] is None else r["energy_dft"][i]
                         for r in records])
    e0 = np.array([r["e0"] for r in records])
    e_opt = np.array([r["e_opt"] for r in records])
    per_step = [aggregate(e0, column(i), e_opt) for i in range(len(steps))]
    final = per_step[-1] if per_step else aggregate([], [], [])

    def mse_stats(key, i):
        v = np.array([r[key][i] for r in records if r[key][i] is not None])
        if not len(v):
            return {"mean": None, "p10": None, "p90": None}
        return {"mean": float(v.mean()), "p10": float(np.percentile(v, 10)),
                "p90": float(np.percentile(v, 90))}

    summary = {"model": args.model if args.model == "rdkit" else args.checkpoint,
               "db": args.db, "n_conformations": len(records),
               "n_failed_oracle": sum(1 for r in records if r["failures"]),   # at any step
               "n_failed_oracle_T": final["n_failed"],      # at s_T: counted in pct_div
               **{k: final[k] for k in STEP_METRICS},
               "steps": steps}
    for key in STEP_METRICS:
        summary[f"{key}_per_step"] = [s[key] for s in per_step]
    summary["energy_mse_kcal_mol2_per_step"] = [mse_stats("energy_mse_kcal_mol2", i)
                                                for i in range(len(steps))]
    summary["forces_mse_kcal_mol_A2_per_step"] = [mse_stats("forces_mse_kcal_mol_A2", i)
                                                  for i in range(len(steps))]
    summary.update(cov_mat(args, records, confs_by_id))
    return summary


def cov_mat(args, records, confs_by_id):
    """COV / MAT over molecules, from final.db's conformations and optimal_positions."""
    refs = [confs_by_id.get(r["conf_id"]) for r in records]
    if not records or any(c is None or c.optimal_positions is None for c in refs):
        return {"cov": None, "mat": None,
                "cov_mat_note": "left out: the test db has no optimal_positions"}
    finals, _ = data.read_db(os.path.join(args.out_dir, "final.db"), "total", verbose=False)
    final_by_id = {int(c.info["conf_id"]): c.positions for c in finals}
    by_molecule = defaultdict(lambda: ([], []))
    for r, c in zip(records, refs):
        gen, ref = by_molecule[data.molecule_key(c)]
        gen.append(final_by_id[r["conf_id"]])
        ref.append(c.optimal_positions)
    covs, mats = [], []
    for key, (gen, ref) in by_molecule.items():
        c = next(c for c in refs if data.molecule_key(c) == key)
        rmsd = lambda a, b: best_rmsd(a, b, c.smiles, c.numbers)   # noqa: E731
        cov, mat = coverage_and_matching(gen, ref, rmsd, args.cov_delta)
        covs.append(cov)
        mats.append(mat)
    return {"cov": float(np.mean(covs)), "mat": float(np.mean(mats)), "cov_delta": args.cov_delta}


# ---------------------------------------------------------------------------------------
# Output: table and plots
# ---------------------------------------------------------------------------------------

TABLE_COLUMNS = [("pct_mean", "pct_T (%)"), ("pct_std", "std"), ("pct_div", "pct_div (%)"),
                 ("n_failed_oracle_T", "no SCF (n)"), ("e_res_mean_kcal_mol", "E_res (kcal/mol)"),
                 ("pct_success", "pct_success (%)"), ("pct_success_all", "of all (%)"),
                 ("cov", "COV (%)"), ("mat", "MAT (A)"), ("n_conformations", "n")]


def format_table(rows):
    """rows: (name, summary) -> a text table like the paper's Table 2."""
    header = ["model"] + [title for _, title in TABLE_COLUMNS]
    lines = [header]
    for name, s in rows:
        cells = [name]
        for key, _ in TABLE_COLUMNS:
            v = s.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and np.isnan(v))
                         else f"{v:.0f}" if key.startswith("n_") else f"{v:.2f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def plot(summary, records, out_dir):
    """Figure 2 (violin of pct_T), Figure 3 (pct_t, pct_div_t), Figure 1 (NNP error)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = summary["steps"]
    last = len(steps) - 1
    pct_T = [pct_of_optimization(r["e0"], r["energy_dft"][last], r["e_opt"]) for r in records
             if r["e0"] is not None and r["energy_dft"][last] is not None
             and r["energy_dft"][last] <= r["e0"]]
    fig, ax = plt.subplots(figsize=(4, 4))
    if pct_T:
        ax.violinplot(pct_T, showmedians=True)
    ax.set_ylabel("pct(s_T), %")
    ax.set_xticks([])
    ax.set_title("Figure 2: optimization percentage")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig2_pct_violin.png"), dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(steps, summary["pct_mean_per_step"], marker="o")
    a1.set(xscale="log", xlabel="step t", ylabel="pct_t, %", title="Figure 3: pct_t")
    a2.plot(steps, summary["pct_div_per_step"], marker="o", color="C3")
    a2.set(xscale="log", xlabel="step t", ylabel="pct_div_t, %", title="diverged")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig3_pct_over_steps.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "energy_mse_kcal_mol2_per_step", "energy MSE, (kcal/mol)^2"),
                           (axes[1], "forces_mse_kcal_mol_A2_per_step",
                            "forces MSE, (kcal/mol/A)^2")):
        pts = [(t, s) for t, s in zip(steps, summary[key]) if s["mean"] is not None]
        if pts:
            t, s = zip(*pts)
            ax.plot(t, [x["mean"] for x in s], marker="o")
            ax.fill_between(t, [x["p10"] for x in s], [x["p90"] for x in s], alpha=0.3)
        ax.set(xscale="log", yscale="log", xlabel="step t", ylabel=label)
    axes[0].set_title("Figure 1: NNP error along the optimization")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig1_nnp_error.png"), dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("optimization", "prediction", "table"), default="optimization")
    p.add_argument("--checkpoint", help="our checkpoint.pt or an official NNP_checkpoint_actor")
    p.add_argument("--model", choices=("nnp", "rdkit"), default="nnp",
                   help="rdkit: the paper's RDKit row (MMFF minimization, then the oracle)")
    p.add_argument("--db", help="test db: rows with optimal_energy (and optimal_positions)")
    p.add_argument("--out_dir", help="summary.json, per_conformation.jsonl, final.db, plots")
    p.add_argument("--timelimit_eval", type=int, default=100, help="T: NNP-optimization steps")
    p.add_argument("--eval_steps", default=EVAL_STEPS, help="steps where DFT is computed")
    p.add_argument("--batch_size", type=int, default=64, help="molecules per NNP batch")
    p.add_argument("--cov_delta", type=float, default=0.5, help="COV threshold, Angstrom")
    p.add_argument("--mmff_max_iters", type=int, default=1000, help="RDKit row: MMFF iterations")
    p.add_argument("--energy_kind", choices=data.ENERGY_KINDS, default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--summaries", nargs="+", help="--task table: summary.json files")
    p.add_argument("--names", nargs="+", help="--task table: row names")
    optimizers.add_optimizer_args(p)
    oracles.add_oracle_args(p)
    return p.parse_args(argv)


def read_summary(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise data.DataError(f"{path}: not a readable summary.json ({err}); pass the "
                             "summary.json files of evaluate.py runs") from None


def main(argv=None):
    args = parse_args(argv)
    if args.task == "table":
        rows = [read_summary(path) for path in args.summaries or []]
        names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(p)))
                               for p in args.summaries]
        print(format_table(list(zip(names, rows))))
        return
    for flag in ("db", "out_dir"):
        if not getattr(args, flag):
            sys.exit(f"error: --{flag} is required for --task {args.task}")
    if args.model == "nnp" and not args.checkpoint:
        sys.exit("error: --checkpoint is required (or --model rdkit)")
    if args.dask_scheduler and args.task == "optimization":   # fail fast, before any output
        oracles.check_dask_scheduler(args.dask_scheduler)
    os.makedirs(args.out_dir, exist_ok=True)
    with data.output_lock(args.out_dir):                    # one writer per out_dir
        evaluate_task(args)


def evaluate_task(args):
    torch.set_num_threads(oracles.torch_threads_beside_the_pool(args))
    if args.task == "prediction":
        confs, _ = data.read_db(args.db, args.energy_kind, require_energy=True, require_forces=True)
        model = painn.load_checkpoint(args.checkpoint, args.device).to(getattr(torch, args.dtype))
        summary = prediction_errors(model, confs, args.batch_size, args.device,
                                    getattr(torch, args.dtype))
    else:
        summary = evaluate_optimization(args)
        records = [r for r in read_records(os.path.join(args.out_dir, "per_conformation.jsonl"))
                   if r["e0"] is not None]
        plot(summary, records, args.out_dir)
        print(format_table([(os.path.basename(os.path.normpath(args.out_dir)), summary)]))
        print(f"plots: {args.out_dir}/fig1_nnp_error.png, fig2_pct_violin.png, "
              "fig3_pct_over_steps.png")
    path = os.path.join(args.out_dir, "summary.json")
    with open(f"{path}.tmp", "w") as f:        # whole or not at all: a kill keeps the old one
        json.dump(summary, f, indent=1)
    os.replace(f"{path}.tmp", path)
    print(f"wrote {args.out_dir}/summary.json")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, painn.CheckpointError, oracles.OracleError) as err:
        sys.exit(f"error: {err}")
