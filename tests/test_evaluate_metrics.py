"""metrics.py and evaluate.py's scoring on small hand-computed cases (Eq. 4, 6, 8, pct_div,
COV/MAT), and report.py's claims."""
import json
import math
import os

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

import data
import evaluate
import metrics
import report

H = data.HARTREE_TO_KCAL


def test_pct_by_hand():
    # E_0 = -100, E_opt = -100.01: half-way is pct 50, overshooting the DFT minimum > 100
    assert metrics.pct_of_optimization(-100.0, -100.005, -100.01) == pytest.approx(50.0)
    assert metrics.pct_of_optimization(-100.0, -100.012, -100.01) == pytest.approx(120.0)
    assert metrics.pct_of_optimization(-100.0, -99.99, -100.01) == pytest.approx(-100.0)


def test_residual_energy_in_kcal():
    assert metrics.residual_energy(-100.0, -100.001) == pytest.approx(0.627509474)


def test_aggregate_by_hand():
    e_opt = np.full(4, -100.01)
    e0 = np.full(4, -100.0)
    # conformation 0: pct 50, E_res 0.005 Ha; 1: pct 120 (below E_opt, E_res < 0);
    # 2: diverged (E_T > E_0); 3: E_res exactly 1 kcal/mol -> not a success (Eq. 8 is strict)
    et = np.array([-100.005, -100.012, -99.99, -100.01 + 1.0 / H])
    agg = metrics.aggregate(e0, et, e_opt)
    pct3 = 100 * (0.01 - 1 / H) / 0.01
    assert agg["n"] == 4
    assert agg["pct_div"] == pytest.approx(25.0)
    assert agg["pct_mean"] == pytest.approx((50 + 120 + pct3) / 3)
    assert agg["pct_std"] == pytest.approx(np.std([50, 120, pct3]))
    assert agg["e_res_mean_kcal_mol"] == pytest.approx((0.005 * H - 0.002 * H + 1.0) / 3)
    assert agg["pct_success"] == pytest.approx(100 * 1 / 3)    # only conformation 1 (E_res<0)
    assert agg["pct_success_all"] == pytest.approx(100 * 1 / 4)


def test_aggregate_counts_failed_oracle_calls_as_diverged():
    # the SCF fails on exploded geometries: that optimization diverged, it is not left out
    agg = metrics.aggregate([-100.0, -100.0], [np.nan, -100.005], [-100.01, -100.01])
    assert agg["n"] == 2 and agg["n_failed"] == 1 and agg["pct_div"] == pytest.approx(50.0)
    assert agg["pct_mean"] == pytest.approx(50.0) and agg["pct_success"] == 0.0   # 3.1 kcal/mol
    agg = metrics.aggregate([-100.0, -100.0], [np.nan, -100.0099], [-100.01, -100.01])
    assert agg["pct_success"] == 100.0 and agg["pct_success_all"] == 50.0


def ethanol_conformers(n, seed):
    mol = Chem.AddHs(Chem.MolFromSmiles("CCCO"))
    ids = AllChem.EmbedMultipleConfs(mol, numConfs=n, randomSeed=seed)
    return mol, [mol.GetConformer(i).GetPositions() for i in ids]


def test_cov_mat_on_known_sets():
    # RMSD table by construction: a fake rmsd from a lookup, the sets are indices
    table = {(0, "a"): 0.1, (1, "a"): 0.9, (0, "b"): 0.7, (1, "b"): 0.6, (0, "c"): 2.0, (1, "c"): 0.4}
    cov, mat = metrics.coverage_and_matching([0, 1], ["a", "b", "c"], lambda g, r: table[g, r], 0.5)
    assert cov == pytest.approx(100 * 2 / 3)                   # a (0.1) and c (0.4) covered
    assert mat == pytest.approx((0.1 + 0.6 + 0.4) / 3)


def test_best_rmsd_is_zero_for_a_moved_copy_and_positive_otherwise():
    mol, confs = ethanol_conformers(2, seed=3)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    moved = confs[0] @ q.T + 5.0
    assert evaluate.best_rmsd(confs[0], moved, "CCCO", numbers) == pytest.approx(0.0, abs=1e-6)
    heavy = numbers > 1
    d = evaluate.best_rmsd(confs[0], confs[1], "CCCO", numbers)
    assert 0 < d <= math.sqrt(((confs[0][heavy] - confs[1][heavy]) ** 2).sum(1).mean()) + 1e-9


def test_table_formatting():
    s = {"pct_mean": 77.3, "pct_std": 20.1, "pct_div": 1.0, "e_res_mean_kcal_mol": 0.5,
         "pct_success": 62.9, "cov": None, "mat": None, "n_conformations": 10}
    text = report.format_table([("golf", s)])
    assert "77.30" in text and "62.90" in text and text.splitlines()[1].split()[0] == "golf"


# ---------------------------------------------------------------------------------------
# Sec. 6 per-step curves, no E_0, unconverged references, bootstrap intervals
# ---------------------------------------------------------------------------------------

def test_per_step_leaves_out_what_diverged_at_T_at_every_step():
    e0 = np.array([-100.0, -100.0, -100.0, -100.0, np.nan])   # E: the oracle failed at s_0
    e_opt = np.full(5, -100.01)
    e_steps = np.array([[-100.002, -100.005],             # A: pct 20, then 50
                        [-100.008, -99.99],               # B: pct 80, then diverged at T
                        [-99.995, -100.01 + 0.5 / H],     # C: E_1 > E_0, then E_res 0.5
                        [np.nan, -100.009],               # D: SCF failed at t=1, pct 90 at T
                        [-100.005, -100.005]])            # E: no E_0
    first, last = metrics.aggregate_steps(e0, e_steps, e_opt)
    pct_c = 100 * (0.01 - 0.5 / H) / 0.01
    # t = 1: diverged at t are C (E_1 > E_0), D (no E_1), E (no E_0); B is not, but it is
    # left out of the means since it diverged at T; C stays in with its negative pct
    assert first["n"] == 5 and first["n_failed"] == 1 and first["n_no_e0"] == 1
    assert first["pct_div"] == pytest.approx(60.0)
    assert first["pct_mean"] == pytest.approx((20 - 50) / 2)
    assert first["pct_p50"] == pytest.approx(-15.0)
    assert first["e_res_mean_kcal_mol"] == pytest.approx((0.008 + 0.015) * H / 2)
    assert first["pct_success"] == 0.0 and first["pct_success_all"] == 0.0
    # t = T: B and E diverged; A (3.1 kcal/mol) fails, C (0.5) and D (0.63) succeed
    assert last["pct_div"] == pytest.approx(40.0)
    assert last["pct_mean"] == pytest.approx((50 + pct_c + 90) / 3)
    assert last["pct_success"] == pytest.approx(100 * 2 / 3)
    assert last["pct_success_all"] == pytest.approx(100 * 2 / 5)
    agg = metrics.aggregate(e0, e_steps[:, -1], e_opt)
    assert all(last[k] == pytest.approx(agg[k]) for k in agg)


def test_bootstrap_of_constant_data_has_zero_width_and_a_seed_fixes_it():
    assert metrics.bootstrap_interval([np.full(7, 3.0)], np.mean, 500, seed=1) == [3.0, 3.0]
    x = np.random.default_rng(0).normal(size=50)
    a = metrics.bootstrap_interval([x], np.mean, 1000, seed=4)
    assert a == metrics.bootstrap_interval([x], np.mean, 1000, seed=4)
    assert a != metrics.bootstrap_interval([x], np.mean, 1000, seed=5)
    assert a[0] < x.mean() < a[1]


def exact_bootstrap_percentiles(columns, statistic, q):
    """Brute force: all n^n equally likely resamples, the q-quantiles (lower/upper) of the
    statistic's exact distribution."""
    import itertools
    n = len(columns[0])
    values = np.sort([statistic(*(c[list(i)] for c in columns))
                      for i in itertools.product(range(n), repeat=n)])
    cdf = np.arange(1, len(values) + 1) / len(values)
    return [values[np.searchsorted(cdf, p / 100)] for p in q]


def test_bootstrap_matches_the_exact_bootstrap_distribution_of_pct_div():
    # 4 conformations, one diverged: a resample's pct_div is 25 k, k ~ Binomial(4, 1/4),
    # whose 2.5 % / 97.5 % quantiles are 0 and 75 (P(k <= 2) = 0.949 < 0.975 <= P(k <= 3))
    e0, e_opt = np.full(4, -100.0), np.full(4, -100.01)
    et = np.array([-100.005, -100.002, -99.99, -100.009])
    div = lambda *c: metrics.aggregate(*c)["pct_div"]   # noqa: E731
    assert exact_bootstrap_percentiles((e0, et, e_opt), div, (2.5, 97.5)) == [0.0, 75.0]
    assert metrics.bootstrap_interval((e0, et, e_opt), div, 20000, seed=0) == [0.0, 75.0]
    # three values 0, 0, 3: 90 % interval [0, 2], 95 % [0, 3] (P(mean <= 2) = 26/27)
    x = np.array([0.0, 0.0, 3.0])
    assert exact_bootstrap_percentiles((x,), np.mean, (5, 95)) == [0.0, 2.0]
    assert metrics.bootstrap_interval((x,), np.mean, 20000, seed=0, level=90) == [0.0, 2.0]
    assert metrics.bootstrap_interval((x,), np.mean, 20000, seed=0) == [0.0, 3.0]


def test_bootstrap_resamples_conformations_jointly_for_pct_div_and_the_non_diverged_means():
    # every non-diverged conformation succeeds: in every resample pct_success is 100 while
    # pct_div and the success share of all vary
    e0, e_opt = np.full(6, -100.0), np.full(6, -100.01)
    et = np.array([-100.0099, -100.0098, -99.9, -100.0097, -99.8, -100.0096])
    ci = metrics.bootstrap_interval(
        (e0, et, e_opt),
        lambda *c: {k: metrics.aggregate(*c)[k] for k in metrics.INTERVAL_METRICS}, 2000, seed=0)
    assert ci["pct_success"] == [100.0, 100.0]
    assert ci["pct_div"][0] < 100 * 2 / 6 < ci["pct_div"][1]
    assert ci["pct_success_all"][0] < 100 * 4 / 6 < ci["pct_success_all"][1]


def summary_args(tmp_path, **kw):
    import argparse
    return argparse.Namespace(**{"model": "nnp", "checkpoint": "ckpt.pt", "db": "test.db",
                                 "out_dir": str(tmp_path), "cov_delta": 0.5, "n_bootstrap": 500,
                                 "bootstrap_seed": 0, "mmff_max_iters": 200, **kw})


def hand_records():
    """Five conformations, two eval steps (see test_per_step_...)."""
    e0 = [-100.0, -100.0, -100.0, -100.0, None]
    e_steps = [[-100.002, -100.005], [-100.008, -99.99], [-99.995, -100.01 + 0.5 / H],
               [None, -100.009], [-100.005, -100.005]]
    return [{"conf_id": i + 1, "smiles": "C", "n_atoms": 5, "e0": e, "e_opt": -100.01,
             "steps": [1, 8], "energy_dft": s, "energy_mse_kcal_mol2": [1.0 * (i + 1), 0.5],
             "forces_mse_kcal_mol_A2": [2.0, 1.0], "failures": []}
            for i, (e, s) in enumerate(zip(e0, e_steps))]


def methane(conf_id, **info):
    return data.Conformation(numbers=np.array([6, 1, 1, 1, 1]), positions=np.zeros((5, 3)),
                             id=conf_id, optimal_energy=-100.01, info=info)


def test_summary_scores_no_e0_as_diverged_skips_unconverged_references_and_is_order_free(tmp_path):
    records = hand_records()
    # row 6 is in the records (an old run) but its reference optimization ran out of steps
    records.append({**records[0], "conf_id": 6, "e0": -100.0, "energy_dft": [-100.0, -100.01]})
    confs = {i: methane(i) for i in range(1, 6)}
    confs[6] = methane(6, converged=False)
    confs[7] = methane(7, converged=False)         # never evaluated
    confs[1] = methane(1, converged=True)
    s = evaluate.summarize(summary_args(tmp_path), records, confs)
    assert s["n_conformations"] == 5 and s["n_unconverged_reference"] == 2 and s["n_no_e0"] == 1
    assert s["pct_div"] == pytest.approx(40.0) and s["pct_div_per_step"] == pytest.approx([60, 40])
    assert s["pct_mean_per_step"][0] == pytest.approx(-15.0)
    assert s["pct_T_values"] == pytest.approx([50, 100 * (0.01 - 0.5 / H) / 0.01, 90])
    assert s["energy_mse_kcal_mol2_per_step"][0]["p50"] == pytest.approx(3.0)
    for k in metrics.INTERVAL_METRICS:
        lo, hi = s[f"{k}_ci95"]
        assert lo <= s[k] <= hi
    # the jsonl is in finishing order: the same records in another order, the same summary
    again = evaluate.summarize(summary_args(tmp_path), records[::-1], confs)
    assert json.dumps(again) == json.dumps(s)
    table = report.format_table([("golf", s)])
    lo, hi = s["pct_div_ci95"]
    assert f"40.00 [{lo:.2f}, {hi:.2f}]" in table
    assert "1 conformations without E_0" in table and table.splitlines()[1].split()[-1] == "2"


def isomer_rows(tmp_path):
    """Ethanol and dimethyl ether (both C2H6O) without SMILES, two conformers each (the
    second ethanol with its atoms in another order), and final.db with NNP 'optima' near
    the DFT ones."""
    rows = []
    rng = np.random.default_rng(0)
    for smiles in ("CCO", "COC"):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        ids = AllChem.EmbedMultipleConfs(mol, numConfs=2, randomSeed=7)
        AllChem.MMFFOptimizeMoleculeConfs(mol)
        for k in ids:
            numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
            optimum = mol.GetConformer(k).GetPositions()
            if smiles == "CCO" and k == 1:
                order = rng.permutation(len(numbers))
                numbers, optimum = numbers[order], optimum[order]
            rows.append(data.Conformation(numbers=numbers, positions=optimum + 0.1,
                                          id=len(rows) + 1, optimal_energy=-150.0,
                                          optimal_positions=optimum))
    final = data.connect_for_writing(str(tmp_path / "final.db"))
    for c in rows:
        near = c.optimal_positions + rng.normal(scale=0.01, size=c.optimal_positions.shape)
        data.write_conformation(final, data.Conformation(numbers=c.numbers, positions=near),
                                conf_id=c.id)
    return rows


def test_cov_mat_tells_isomers_apart_without_smiles(tmp_path):
    rows = isomer_rows(tmp_path)
    # before: one formula, one "molecule"
    assert len({data.molecule_key(c) for c in rows}) == 1
    keys = [evaluate.molecule_identity(c)[0] for c in rows]
    assert keys[0] == keys[1] == "perceived:CCO" and keys[2] == keys[3] == "perceived:COC"
    records = [{"conf_id": c.id} for c in rows]
    out = evaluate.cov_mat(summary_args(tmp_path), records, {c.id: c for c in rows})
    assert out["n_molecules"] == 2 and out["n_cov_mat_unidentified"] == 0
    assert "rdDetermineBonds" in out["molecule_identity"]
    assert out["cov"] == 100.0 and 0 < out["mat"] < 0.05


def test_mmff_minimize_checked_reports_convergence():
    import oracles
    mol = Chem.AddHs(Chem.MolFromSmiles("CCCCO"))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    conf = data.Conformation(numbers=np.array([a.GetAtomicNum() for a in mol.GetAtoms()]),
                             positions=mol.GetConformer().GetPositions(), smiles="CCCCO")
    positions, converged = oracles.mmff_minimize_checked(conf, 2)
    assert not converged
    positions, converged = oracles.mmff_minimize_checked(conf)
    assert converged
    np.testing.assert_array_equal(positions, oracles.mmff_minimize(conf))


def test_figures_put_every_model_in_one_picture(tmp_path):
    s = evaluate.summarize(summary_args(tmp_path), hand_records(), {})
    no_nnp = [{"mean": None, "p10": None, "p50": None, "p90": None}]
    rdkit = {**s, "steps": [8], "pct_mean_per_step": [s["pct_mean"]],
             "pct_p10_per_step": [40.0], "pct_p90_per_step": [90.0], "pct_div_per_step": [40.0],
             "energy_mse_kcal_mol2_per_step": no_nnp, "forces_mse_kcal_mol_A2_per_step": no_nnp}
    figs = report.draw_figures([("golf", s), ("baseline", s), ("rdkit", rdkit)])
    fig1, fig2, fig3 = (figs[name] for name in report.FIGURES)
    assert [len(ax.lines) for ax in fig1.axes[:2]] == [2, 2]          # no NNP in the RDKit row
    assert [len(ax.collections) for ax in fig1.axes[:2]] == [2, 2]    # p10-p90 bands
    np.testing.assert_allclose(fig1.axes[0].lines[0].get_ydata(), [3.0, 0.5])   # medians
    assert len(fig2.axes[0].collections) == 3 + 1 + 1     # violins, the mean, p10/p90 marks
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()] == ["golf", "baseline", "rdkit"]
    assert len(fig3.axes[0].lines) == 3 and len(fig3.axes[0].collections) == 3
    np.testing.assert_allclose(fig3.axes[1].lines[0].get_ydata(), [60.0, 40.0])   # pct_div_t
    import matplotlib.pyplot as plt
    for fig in figs.values():
        plt.close(fig)
    # a run where everything diverged at T has no pct_t curve, only pct_div_t
    nan = float("nan")
    lost = {**s, "pct_mean_per_step": [nan, nan], "pct_p10_per_step": [nan, nan],
            "pct_p90_per_step": [nan, nan], "pct_T_values": []}
    figs = report.draw_figures([("lost", lost)])
    assert len(figs["fig3_pct_over_steps.png"].axes[0].lines) == 0
    assert len(figs["fig3_pct_over_steps.png"].axes[1].lines) == 1
    report.save_figures(figs, str(tmp_path / "lost"))
    # a start at its optimum has pct_T = +-inf (Eq. 4 divides by E_0 - E_opt = 0): not drawn
    inf = float("inf")
    at_opt = {**s, "pct_T_values": [inf, inf]}     # both ended below E_opt = E_0
    fig2 = report.draw_figures([("at_opt", at_opt), ("golf", s)])["fig2_pct_violin.png"]
    assert len(fig2.axes[0].collections) == 1 + 1 + 1     # golf's violin, the mean, p10/p90
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()] == ["golf"]
    # the table task draws them from summary.json files
    paths = []
    for name, summary in (("golf", s), ("rdkit", rdkit)):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name / "summary.json"))
        json.dump(summary, open(paths[-1], "w"))
    evaluate.main(["--task", "table", "--summaries", *paths, "--figures", str(tmp_path / "figs")])
    assert all(os.path.getsize(tmp_path / "figs" / name) > 0 for name in report.FIGURES)


def test_table_task_names_a_missing_summary_in_one_line(tmp_path, capsys):
    assert evaluate.main(["--task", "table", "--summaries",
                          str(tmp_path / "nope" / "summary.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope/summary.json: not a readable summary.json" in err
    assert err.count("\n") == 1


def test_records_are_written_while_later_batches_still_optimize(tmp_path, monkeypatch):
    """A conformation's record is appended as soon as its oracle jobs are done, not after
    the NNP has optimized every batch: a kill then loses one batch at most (real GFN2-xTB)."""
    import time
    import make_trajectories
    db_path = str(tmp_path / "test.db")
    db = data.connect_for_writing(db_path)
    for conf_id, smiles in enumerate(("O", "C", "N")):
        numbers, (positions,) = make_trajectories.embed(smiles, 1, 7)
        data.write_conformation(db, data.Conformation(
            numbers, positions, smiles=smiles, optimal_energy=-10.0,
            optimal_positions=positions), conf_id=conf_id)
    records = tmp_path / "eval" / "per_conformation.jsonl"
    lines_when_asked = []
    real = evaluate.nnp_optimize

    def watched(model, confs, args, eval_steps):
        for i, item in enumerate(real(model, confs, args, eval_steps)):
            lines_when_asked.append(len(records.read_text().splitlines())
                                    if records.exists() else 0)
            if i == 1:
                time.sleep(3)       # conformation 0's xTB jobs (ms each) are done by now
            yield item

    monkeypatch.setattr(evaluate, "nnp_optimize", watched)
    evaluate.main(["--checkpoint", "models/official/GOLF-10k.NNP_checkpoint_actor",
                   "--db", db_path, "--out_dir", str(tmp_path / "eval"), "--batch_size", "1",
                   "--timelimit_eval", "2", "--eval_steps", "1,2", "--page_conformations", "0",
                   "--oracle_method", "gfn2-xtb", "--n_workers", "1"])
    assert lines_when_asked[0] == 0 and lines_when_asked[2] >= 1    # before batch 3 ran
    assert len(records.read_text().splitlines()) == 3


def write_evaluation(folder, outcomes, e_opt=-1.0):
    """An evaluation folder with summary.json and per_conformation.jsonl. outcomes, one per
    conformation: E_T in kcal/mol above E_opt (a number; E_0 lies 20 above), 'diverged'
    (E_T above E_0) or 'failed' (no E_T); also the words 'success' (0.5) and 'done' (5)."""
    os.makedirs(folder)
    e0 = e_opt + 20.0 / data.HARTREE_TO_KCAL
    words = {"success": 0.5, "done": 5.0}

    def e_T(o):
        if o == "failed":
            return None
        if o == "diverged":
            return e0 + 1e-3
        return e_opt + words.get(o, o) / data.HARTREE_TO_KCAL
    with open(os.path.join(folder, "per_conformation.jsonl"), "w") as f:
        for i, o in reversed(list(enumerate(outcomes))):
            f.write(json.dumps({"conf_id": i, "e0": e0, "e_opt": e_opt, "steps": [1, 100],
                                "energy_dft": [e0, e_T(o)]}) + "\n")
    json.dump({"n_unconverged_reference": 0}, open(os.path.join(folder, "summary.json"), "w"))
    return os.path.join(folder, "summary.json")


def claims_text(tmp_path, runs, claims, floor=None):
    """report.check_claims of hand-made evaluations runs [(name, outcomes)]."""
    energies = [(name, evaluate.scored_energies(write_evaluation(tmp_path / f"{name}{i}", o)))
                for i, (name, o) in enumerate(runs)]
    return report.check_claims(energies, claims, 500, success_floor=floor)


def line_of(text, start):
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


def test_claim_metrics_are_the_papers_by_hand(tmp_path):
    """Point estimates of Eq. 4-8 on four conformations, E_0 20 kcal/mol above E_opt:
    A ends 0.5, 2, 10 kcal/mol above E_opt and fails once; B diverges once, ends 5, 15, 0.2.
    pct_T, E_res and pct_success are over the three kept, pct_div and 'of all' over four."""
    runs = [("A", [0.5, 2.0, 10.0, "failed"]), ("B", ["diverged", 5.0, 15.0, 0.2])]
    text = claims_text(tmp_path, runs, [(report.parse_claim("t: A > B"), None)])
    a, b = line_of(text, "A: pct_T"), line_of(text, "B: pct_T")
    # A: pct (97.5 + 90 + 50) / 3 = 79.17; E_res 12.5 / 3 = 4.17; success 1 / 3; of all 1 / 4
    assert a.startswith("A: pct_T 79.2 [") and "pct_div 25.0 [" in a and "E_res 4.17 [" in a
    assert "pct_success 33.3 [" in a and "of all 25.0 [" in a
    # B: pct (75 + 25 + 99) / 3 = 66.33; E_res 20.2 / 3 = 6.73
    assert b.startswith("B: pct_T 66.3 [") and "E_res 6.73 [" in b and "pct_div 25.0 [" in b
    assert "pct_T: A - B = +12.8 [" in text           # higher is better: A - B
    assert "E_res: B - A = +2.57 [" in text            # lower is better: B - A, A's favour
    assert "of all: A - B = +0.0 [" in text and "(beside, no verdict)" in text


def test_each_metric_gets_its_verdict_and_seeds_pool(tmp_path):
    n = 40
    runs = [("base", ["diverged"] * 30 + [10.0] * 10),               # 75 % diverged
            ("traj", ["diverged"] * 10 + [5.0] * 30),
            ("golf", [0.5] * 40),                                     # pct_success 100 %
            ("golf", [0.5] * 38 + ["failed"] * 2)]                    # seed 2
    claims = [(report.parse_claim("golf beats both: golf > base; golf > traj"), None),
              (report.parse_claim("base beats golf: base > golf"), None),
              (report.parse_claim("traj near golf in pct_success: traj >= golf @ pct_success"),
               None)]
    text = claims_text(tmp_path, runs, claims)
    assert text.splitlines()[0] == f"{n} conformations, seeds: base 1, golf 2, traj 1"
    assert "golf: pct_T 97.5 [" in text and "pct_div 2.5 [" in text       # pooled seeds
    assert line_of(text, "claim golf beats both") == (
        "claim golf beats both: pct_T HOLDS, pct_div HOLDS, E_res HOLDS, pct_success HOLDS")
    assert line_of(text, "claim base beats golf") == (
        "claim base beats golf: pct_T FAILS, pct_div FAILS, E_res FAILS, pct_success FAILS")
    assert line_of(text, "claim traj near golf").startswith(
        "claim traj near golf in pct_success: decided on pct_success: FAILS (the other metrics:")
    assert "pct_div: base - golf = +72.5 [" in text and "golf matches" not in text


def test_matches_means_within_the_margin_and_beats_needs_zero_outside(tmp_path):
    """200 conformations; B succeeds on 2 fewer (1 point): 'A matches or beats B' holds both
    ways on pct_success (the interval lies within the 5-point margin), 'beats' is not shown."""
    a = [0.5] * 200
    b = [0.5] * 198 + [3.0, 3.0]
    claims = [(report.parse_claim(spec), None) for spec in
              ("m1: B >= A @ pct_success", "m2: A >= B @ pct_success", "b1: A > B @ pct_success")]
    text = claims_text(tmp_path, [("A", a), ("B", b)], claims)
    assert line_of(text, "claim m1").startswith("claim m1: decided on pct_success: HOLDS")
    assert line_of(text, "claim m2").startswith("claim m2: decided on pct_success: HOLDS")
    assert line_of(text, "claim b1").startswith("claim b1: decided on pct_success: NOT SHOWN")
    assert "pct_success: B - A = -1.0 [" in text


def test_pct_success_at_the_scorer_floor_is_not_decided(tmp_path):
    """Both success rates at or below --success_floor: a comparison that would fail or is
    not shown on pct_success says so instead; other metrics keep their verdicts."""
    runs = [("low", [5.0] * 40), ("lower", [5.0] * 36 + [0.5] * 4)]   # 0 % and 10 %
    claims = [(report.parse_claim("x: low > lower"), None)]
    without = line_of(claims_text(tmp_path / "a", runs, claims), "claim x")
    assert without == "claim x: pct_T FAILS, pct_div NOT SHOWN, E_res FAILS, pct_success FAILS"
    text = claims_text(tmp_path / "b", runs, claims, floor=10)
    assert line_of(text, "claim x") == ("claim x: pct_T FAILS, pct_div NOT SHOWN, E_res FAILS, "
                                        "pct_success NOT DECIDED (scorer floor, 10 %)")
    assert "pct_success: low - lower = -10.0 [" in text and "not decided: both at or below 10 %" in text
    text = claims_text(tmp_path / "c", runs, claims, floor=5)             # 10 % is above 5
    assert line_of(text, "claim x").endswith("pct_success FAILS")


def test_the_five_claims_of_a_run_of_ours(tmp_path):
    runs = [("base", ["diverged"] * 30 + ["success"] * 2 + ["done"] * 8),
            ("traj", ["diverged"] * 10 + ["success"] * 10 + ["done"] * 20),
            ("golf", ["failed"] * 4 + ["success"] * 24 + ["done"] * 12),
            ("rdkit", ["done"] * 20 + ["success"] * 20)]
    text = claims_text(tmp_path, runs, report.role_claims(["base", "traj", "-", "golf", "rdkit"]))
    assert line_of(text, "claim 1.").endswith("pct_T HOLDS, pct_div HOLDS, E_res HOLDS, "
                                              "pct_success HOLDS")
    assert line_of(text, "claim 2.") == ("claim 2. traj-K improves with K (traj-20K beats "
                                         "traj-K): NOT CHECKED (no traj-20K row)")
    assert "claim 3. GOLF-K beats traj-K at equal K: pct_T HOLDS" in text
    assert "NOT CHECKED (no traj-20K row)" in line_of(text, "claim 4.")
    # golf vs rdkit: golf diverges more (10 % vs 0 %, every resample) and succeeds on 60 %
    # of its kept against 50 %: each metric's own verdict
    assert line_of(text, "claim 5.") == ("claim 5. GOLF-K beats f_rdkit: pct_T NOT SHOWN, "
                                         "pct_div FAILS, E_res NOT SHOWN, pct_success NOT SHOWN")


def test_a_claim_spec_is_parsed_or_refused_in_one_line():
    claim = report.parse_claim("GOLF-10k matches traj-500k: f_GOLF-10k >= f_traj-500k; "
                               "f_GOLF-1k > f_traj-100k @ pct_success")
    assert claim.title == "GOLF-10k matches traj-500k" and claim.decided_on == ("pct_success",)
    assert claim.comparisons == [("f_GOLF-10k", ">=", "f_traj-500k"),
                                 ("f_GOLF-1k", ">", "f_traj-100k")]
    for bad in ("no colon here", "t: A beats B", "t: A > B @ pct_nothing"):
        with pytest.raises(data.DataError, match="write 'TITLE: A > B"):
            report.parse_claim(bad)


def test_claims_name_a_missing_row_in_one_line(tmp_path):
    import subprocess
    import sys
    path = write_evaluation(tmp_path / "golf", ["success", "diverged"])
    r = subprocess.run([sys.executable, "evaluate.py", "--task", "table", "--summaries", path,
                        "--names", "golf", "--claims", "base", "-", "-", "golf", "-",
                        "--claims_only"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: --claims: no summary named base among --names"


def test_the_claims_numbers_and_intervals_are_table_2s():
    """report.py's claims (metrics.weighted_metrics under bootstrap weights) and
    summary.json (metrics.aggregate, metrics.bootstrap_interval) are one definition: one
    seed with unit weights gives aggregate's numbers, and one draw the same intervals."""
    rng = np.random.default_rng(3)
    n = 40
    e_opt = np.full(n, -100.01)
    e0 = np.where(rng.random(n) < 0.1, np.nan, -100.0)             # some without E_0
    et = -100.01 + rng.uniform(-0.001, 0.012, n)    # below E_opt, successes, above E_0
    et[rng.random(n) < 0.1] = np.nan                               # some without E_T
    keys = {"pct_T": "pct_mean", "pct_div": "pct_div", "E_res": "e_res_mean_kcal_mol",
            "pct_success": "pct_success", "of all": "pct_success_all"}
    draws = metrics.resamples(n, 300, seed=5)
    weights = np.vstack([np.ones(n)] + [np.bincount(d, minlength=n) for d in draws])
    claimed = metrics.weighted_metrics(([e0], [et], [e_opt]), weights)
    agg = metrics.aggregate(e0, et, e_opt)
    ci = metrics.bootstrap_interval(
        (e0, et, e_opt), lambda *c: {k: metrics.aggregate(*c)[k] for k in metrics.INTERVAL_METRICS},
        300, seed=5)
    assert 0 < agg["pct_div"] < 100 and 0 < agg["pct_success"] < 100
    for name, key in keys.items():
        point, lo, hi = report.interval(claimed[name])
        assert point == pytest.approx(agg[key]), name
        assert [lo, hi] == pytest.approx(ci[key]), name
