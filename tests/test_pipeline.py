"""The four stages end to end with real Psi4 at a cheap level (hf/sto-3g) on small
molecules: make_trajectories -> train_baseline -> golf (K = 10) -> evaluate."""
import json
import os
import shutil

import ase.db
import numpy as np
import pytest
import torch

import data
import evaluate
import golf
import make_trajectories
import painn
import report
import train_baseline

ORACLE = ["--oracle_method", "hf/sto-3g", "--n_workers", "2"]
MODEL = ["--n_atom_basis", "16", "--n_interactions", "2", "--n_rbf", "10"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """D0 (single points), a test db (Psi4 optima) and f_baseline, made once."""
    root = tmp_path_factory.mktemp("pipeline")
    smiles = root / "mols.smi"
    smiles.write_text("CO methanol\nCC ethane\nC=O formaldehyde\nCN methylamine\n"
                      "OO hydrogen_peroxide\nC=C ethylene\nCCO ethanol\nNC=O formamide\n")
    d0, test = str(root / "d0.db"), str(root / "test.db")
    make_trajectories.main(["--smiles", str(smiles), "--max_molecules", "6",
                            "--conformers_per_molecule", "3", "--mode", "single_point",
                            "--out", d0, *ORACLE])
    make_trajectories.main(["--smiles", str(smiles), "--skip_molecules", "6", "--mode", "optimize",
                            "--conformers_per_molecule", "2", "--out", str(root / "test_traj.db"),
                            "--out_optimal", test, *ORACLE])
    train_baseline.main(["--db", d0, "--out_dir", str(root / "baseline"), *MODEL,
                         "--total_steps", "300", "--batch_size", "8", "--lr", "3e-3",
                         "--val_fraction", "0.2", "--eval_every", "30"])
    return root, d0, test


def test_golf_with_real_psi4(stages):
    root, d0, _ = stages
    out = root / "golf"
    golf.main(["--d0", d0, "--load_baseline", str(root / "baseline" / "checkpoint.pt"),
               "--out_dir", str(out), "--max_oracle_steps", "10", "--utd_ratio", "3",
               "--n_parallel", "4", "--timelimit_train", "10", "--batch_size", "8",
               "--lr", "1e-3", *ORACLE])
    collected, _ = data.read_db(str(out / "collected.db"), "total")
    assert len(collected) == 10
    # every added conformation carries the genuine oracle's label: check one against Psi4
    import oracle_pool
    with oracle_pool.LocalOraclePool(method="hf/sto-3g", n_workers=1) as pool:
        again = pool.submit(collected[0], 0).result()
    assert again.ok and again.energy == pytest.approx(collected[0].energy, abs=1e-6)
    np.testing.assert_allclose(again.forces, collected[0].forces, atol=1e-5)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["step"] == 10 * 3
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert log[-1]["event"] == "done" and log[-1]["n_added"] == 10
    # they are NNP-optimized conformations s_t, or D0 starts s_0 where MMFF rose at step 1
    d0_positions = [c.positions for c in data.read_db(d0, "total")[0]]
    n_starts = sum(any(c.n_atoms == p.shape[0] and np.array_equal(c.positions, p)
                       for p in d0_positions) for c in collected)
    assert n_starts <= log[-1]["n_rise_at_start"]
    assert all(c.info["trajectory_step"] >= 1 for c in collected)


def test_evaluate_end_to_end(stages):
    root, _, test = stages
    out = root / "eval"
    argv = ["--checkpoint", str(root / "baseline" / "checkpoint.pt"), "--db", test,
            "--out_dir", str(out), "--timelimit_eval", "8", "--eval_steps", "1,3,8", *ORACLE]
    evaluate.main(argv)
    for name in ("summary.json", "per_conformation.jsonl", "final.db", "fig1_nnp_error.png",
                 "fig2_pct_violin.png", "fig3_pct_over_steps.png"):
        assert os.path.getsize(out / name) > 0
    summary = json.load(open(out / "summary.json"))
    records = evaluate.read_records(out / "per_conformation.jsonl")
    assert summary["n_conformations"] == len(records) == 4 and summary["steps"] == [1, 3, 8]
    # the summary is the per-conformation records aggregated as Eq. 4-8 say
    e0 = np.array([r["e0"] for r in records])
    e_opt = np.array([r["e_opt"] for r in records])
    # an SCF that fails at a wild NNP geometry is a failure record, and a diverged one
    e_T = np.array([np.nan if r["energy_dft"][-1] is None else r["energy_dft"][-1]
                    for r in records])
    assert summary["n_failed_oracle"] == sum(bool(r["failures"]) for r in records)
    assert summary["n_failed_oracle_T"] == int((~np.isfinite(e_T)).sum())
    ok = np.isfinite(e_T) & (e_T <= e0)
    assert summary["pct_div"] == pytest.approx(100 * (~ok).mean())
    if ok.any():
        pct = 100 * (e0 - e_T) / (e0 - e_opt)
        assert summary["pct_mean"] == pytest.approx(pct[ok].mean())
        e_res = (e_T - e_opt) * data.HARTREE_TO_KCAL
        assert summary["pct_success"] == pytest.approx(100 * (e_res[ok] < 1).mean())
        assert summary["pct_success_all"] == pytest.approx(100 * (e_res[ok] < 1).sum() / 4)
    assert summary["cov"] is not None and 0 <= summary["cov"] <= 100 and summary["mat"] >= 0
    # make_trajectories' optima converged (key converged True): all scored; 95 % intervals
    assert summary["n_unconverged_reference"] == 0 and summary["n_no_e0"] == 0
    lo, hi = summary["pct_div_ci95"]
    assert lo <= summary["pct_div"] <= hi
    # E_0 came from the db, E_T from Psi4 at the final conformation in final.db
    test_confs = {c.id: c for c in data.read_db(test, "total")[0]}
    assert all(r["e0"] == test_confs[r["conf_id"]].energy for r in records)
    finals, _ = data.read_db(str(out / "final.db"), "total")
    assert {f.info["conf_id"]: f.energy for f in finals} == {r["conf_id"]: r["energy_dft"][-1]
                                                             for r in records}
    assert all(f.n_atoms == test_confs[f.info["conf_id"]].n_atoms for f in finals)
    # a rerun finds everything done and writes the same summary
    evaluate.main(argv)
    assert json.load(open(out / "summary.json")) == summary
    # the RDKit row and the prediction task; the RDKit row on a copy of the test db where
    # one reference optimization ran out of steps: that row is neither evaluated nor scored
    unconverged = str(root / "test_unconverged.db")
    shutil.copy(test, unconverged)
    with ase.db.connect(unconverged) as db:
        db.update(min(test_confs), converged=False)
    evaluate.main(["--model", "rdkit", "--db", unconverged, "--out_dir",
                   str(root / "eval_rdkit"), "--timelimit_eval", "8", *ORACLE])
    rd = json.load(open(root / "eval_rdkit" / "summary.json"))
    assert rd["n_conformations"] == 3 and rd["n_unconverged_reference"] == 1
    assert rd["steps"] == [8]
    rd_records = evaluate.read_records(root / "eval_rdkit" / "per_conformation.jsonl")
    assert sorted(r["conf_id"] for r in rd_records) == sorted(test_confs)[1:]
    assert rd["n_mmff_unconverged"] == sum(r["mmff_converged"] is False for r in rd_records)
    # Table 2 and Figures 1-3 of both rows
    evaluate.main(["--task", "table", "--summaries", str(out / "summary.json"),
                   str(root / "eval_rdkit" / "summary.json"), "--figures", str(root / "figs")])
    assert all(os.path.getsize(root / "figs" / name) > 0 for name in report.FIGURES)
    evaluate.main(["--task", "prediction", "--checkpoint", str(root / "baseline" / "checkpoint.pt"),
                   "--db", test, "--out_dir", str(root / "pred")])
    pred = json.load(open(root / "pred" / "summary.json"))
    assert pred["n_conformations"] == 4 and pred["energy_mae_kcal_mol"] > 0


def test_golf_twice_gives_the_same_collected_db_and_weights(stages):
    """The default loop (jobs enter in the order sent, oracle lag L) with real Psi4 and 2
    workers, whose results arrive in any order: the same command twice adds the same
    conformations with the same labels and trains the same weights (only the
    oracle_seconds key, a timing, may differ)."""
    root, d0, _ = stages
    runs = []
    for attempt in ("a", "b"):
        out = root / f"golf_twice_{attempt}"
        golf.main(["--d0", d0, "--load_baseline", str(root / "baseline" / "checkpoint.pt"),
                   "--out_dir", str(out), "--max_oracle_steps", "4", "--utd_ratio", "2",
                   "--n_parallel", "3", "--timelimit_train", "5", "--batch_size", "8",
                   "--lr", "1e-3", *ORACLE])
        collected, _ = data.read_db(str(out / "collected.db"), "total")
        runs.append((collected, torch.load(out / "checkpoint.pt", weights_only=True)))
    (a, ckpt_a), (b, ckpt_b) = runs
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.forces, y.forces)
        assert x.energy == y.energy and x.smiles == y.smiles
        assert {k: v for k, v in x.info.items() if k != "oracle_seconds"} == \
            {k: v for k, v in y.info.items() if k != "oracle_seconds"}
    weights_a, weights_b = ckpt_a["model"]["state_dict"], ckpt_b["model"]["state_dict"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
