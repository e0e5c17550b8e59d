"""evaluate.py's metrics on small hand-computed cases (Eq. 4, 6, 8, pct_div, COV/MAT)."""
import math

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

import data
import evaluate

H = data.HARTREE_TO_KCAL


def test_pct_by_hand():
    # E_0 = -100, E_opt = -100.01: half-way is pct 50, overshooting the DFT minimum > 100
    assert evaluate.pct_of_optimization(-100.0, -100.005, -100.01) == pytest.approx(50.0)
    assert evaluate.pct_of_optimization(-100.0, -100.012, -100.01) == pytest.approx(120.0)
    assert evaluate.pct_of_optimization(-100.0, -99.99, -100.01) == pytest.approx(-100.0)


def test_residual_energy_in_kcal():
    assert evaluate.residual_energy(-100.0, -100.001) == pytest.approx(0.627509474)


def test_aggregate_by_hand():
    e_opt = np.full(4, -100.01)
    e0 = np.full(4, -100.0)
    # conformation 0: pct 50, E_res 0.005 Ha; 1: pct 120 (below E_opt, E_res < 0);
    # 2: diverged (E_T > E_0); 3: E_res exactly 1 kcal/mol -> not a success (Eq. 8 is strict)
    et = np.array([-100.005, -100.012, -99.99, -100.01 + 1.0 / H])
    agg = evaluate.aggregate(e0, et, e_opt)
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
    agg = evaluate.aggregate([-100.0, -100.0], [np.nan, -100.005], [-100.01, -100.01])
    assert agg["n"] == 2 and agg["n_failed"] == 1 and agg["pct_div"] == pytest.approx(50.0)
    assert agg["pct_mean"] == pytest.approx(50.0) and agg["pct_success"] == 0.0   # 3.1 kcal/mol
    agg = evaluate.aggregate([-100.0, -100.0], [np.nan, -100.0099], [-100.01, -100.01])
    assert agg["pct_success"] == 100.0 and agg["pct_success_all"] == 50.0


def ethanol_conformers(n, seed):
    mol = Chem.AddHs(Chem.MolFromSmiles("CCCO"))
    ids = AllChem.EmbedMultipleConfs(mol, numConfs=n, randomSeed=seed)
    return mol, [mol.GetConformer(i).GetPositions() for i in ids]


def test_cov_mat_on_known_sets():
    # RMSD table by construction: a fake rmsd from a lookup, the sets are indices
    table = {(0, "a"): 0.1, (1, "a"): 0.9, (0, "b"): 0.7, (1, "b"): 0.6, (0, "c"): 2.0, (1, "c"): 0.4}
    cov, mat = evaluate.coverage_and_matching([0, 1], ["a", "b", "c"], lambda g, r: table[g, r], 0.5)
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
    text = evaluate.format_table([("golf", s)])
    assert "77.30" in text and "62.90" in text and text.splitlines()[1].split()[0] == "golf"
