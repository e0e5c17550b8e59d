"""The paper's other commands: Table 6's optimizer presets, scoring another method's final
conformations (evaluate.py --model external), and Table 4's D_LM size filter."""
import json
import os
import subprocess
import sys

import ase.db
import numpy as np
import pytest

import data
import evaluate
import golf
import make_trajectories

METHOD = "hf/sto-3g"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLF_ARGS = ["--d0", "d0.db", "--out_dir", "out", "--load_baseline", "baseline.pt"]


# ---------------------------------------------------------------------------------------
# Table 6 presets
# ---------------------------------------------------------------------------------------

# Table 6 (App. B): optimizer, rate, T_train, T_eval; 2e5 updates with U = 20
TABLE6 = {"golf-lbfgs": ("lbfgs", 1.0, 100, 100),
          "golf-adam": ("adam", 5e-3, 200, 500),
          "golf-sgd": ("sgd", 5e-3, 200, 500)}


@pytest.mark.parametrize("preset", sorted(TABLE6))
def test_presets_give_table6(preset):
    opt, lr, t_train, t_eval = TABLE6[preset]
    a = golf.parse_args(GOLF_ARGS + ["--optimizer_preset", preset])
    assert (a.conf_opt, a.conf_opt_lr, a.timelimit_train) == (opt, lr, t_train)
    assert (a.utd_ratio, a.max_oracle_steps, a.total_steps) == (20, 10_000, 200_000)
    e = evaluate.parse_args(["--optimizer_preset", preset])
    assert (e.conf_opt, e.conf_opt_lr, e.timelimit_eval) == (opt, lr, t_eval)
    assert not hasattr(e, "timelimit_train") and not hasattr(a, "timelimit_eval")


def test_explicit_flags_override_the_preset():
    a = golf.parse_args(GOLF_ARGS + ["--utd_ratio", "5", "--optimizer_preset", "golf-adam",
                                     "--conf_opt_lr=0.1", "--timelimit_train", "7"])
    assert (a.conf_opt, a.conf_opt_lr, a.timelimit_train, a.utd_ratio) == ("adam", 0.1, 7, 5)
    assert a.total_steps == 10_000 * 5
    e = evaluate.parse_args(["--optimizer_preset", "golf-sgd", "--timelimit_eval", "50"])
    assert (e.conf_opt, e.timelimit_eval) == ("sgd", 50)
    # without a preset, Table 5's defaults
    a = golf.parse_args(GOLF_ARGS)
    assert (a.conf_opt, a.conf_opt_lr, a.utd_ratio, a.timelimit_train) == ("lbfgs", None, 50, 100)


# ---------------------------------------------------------------------------------------
# evaluate.py --model external, with real Psi4
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_db(tmp_path_factory):
    """Water, methane, ammonia: ETKDG starts with their HF/STO-3G optima (--mode optimize)."""
    tmp = tmp_path_factory.mktemp("external")
    smi = tmp / "tiny.smi"
    smi.write_text("O water\nC methane\nN ammonia\n")
    out = str(tmp / "traj.db")
    optimal = str(tmp / "test.db")
    assert make_trajectories.main(["--smiles", str(smi), "--mode", "optimize", "--out", out,
                                   "--out_optimal", optimal, "--oracle_method", METHOD,
                                   "--n_workers", "2"]) == 0
    return optimal


def write_positions(path, rows, positions_of, with_conf_id=True):
    """An external method's output db: one row per test row, in reverse order."""
    db = data.connect_for_writing(path)
    for row in reversed(rows):
        conf = data.Conformation(numbers=row.numbers, positions=positions_of(row))
        keys = {"conf_id": row.id} if with_conf_id else {}
        data.write_conformation(db, conf, **keys)


def run_external(test_db, positions, out_dir):
    evaluate.main(["--model", "external", "--positions", positions, "--db", test_db,
                   "--out_dir", out_dir, "--oracle_method", METHOD, "--n_workers", "2"])
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    return summary, evaluate.read_records(os.path.join(out_dir, "per_conformation.jsonl"))


def test_external_optimum_scores_100_percent(test_db, tmp_path):
    """The DFT optima themselves, written in reverse row order: each must be matched to its
    own row (the three molecules' energies differ by tens of Hartree), and then E_T = E_opt."""
    rows = list(ase.db.connect(test_db).select())
    positions = str(tmp_path / "optima.db")
    write_positions(positions, rows, lambda row: row.data["optimal_positions"])
    summary, records = run_external(test_db, positions, str(tmp_path / "eval"))
    assert len(records) == 3
    for r in records:
        assert r["energy_dft"][-1] == pytest.approx(r["e_opt"], abs=1e-7)
    assert summary["pct_mean"] == pytest.approx(100.0, abs=1e-3)
    assert summary["e_res_mean_kcal_mol"] == pytest.approx(0.0, abs=1e-4)
    assert summary["pct_div"] == 0.0 and summary["pct_success"] == 100.0
    assert summary["cov"] == 100.0 and summary["mat"] == pytest.approx(0.0, abs=1e-3)
    assert summary["model"] == f"external:{positions}"
    assert summary["name"] == "optima"            # without --name: the file's name


def test_external_halfway_conformations(test_db, tmp_path):
    """Halfway between start and optimum (matched by row id, no conf_id key): less than the
    whole optimization, and Eq. 4 / Eq. 6 by hand from the oracle's energies."""
    rows = list(ase.db.connect(test_db).select())
    positions = str(tmp_path / "halfway.db")
    db = data.connect_for_writing(positions)
    for row in rows:      # same order as the test db: row ids match
        halfway = 0.5 * (row.positions + row.data["optimal_positions"])
        data.write_conformation(db, data.Conformation(numbers=row.numbers, positions=halfway))
    summary, records = run_external(test_db, positions, str(tmp_path / "eval"))
    pct = [100 * (r["e0"] - r["energy_dft"][-1]) / (r["e0"] - r["e_opt"]) for r in records]
    assert all(0 < p < 100 for p in pct)
    assert summary["pct_mean"] == pytest.approx(np.mean(pct), abs=1e-9)
    e_res = [(r["energy_dft"][-1] - r["e_opt"]) * data.HARTREE_TO_KCAL for r in records]
    assert all(e > 0 for e in e_res)
    assert summary["e_res_mean_kcal_mol"] == pytest.approx(np.mean(e_res), abs=1e-9)
    # COV / MAT use heavy atoms (App. F): one each here, so every RMSD is 0 after alignment
    assert summary["mat"] == pytest.approx(0.0, abs=1e-6) and summary["cov"] == 100.0


def test_external_missing_rows_is_one_clear_error(test_db, tmp_path):
    rows = list(ase.db.connect(test_db).select())[:2]
    positions = str(tmp_path / "partial.db")
    write_positions(positions, rows, lambda row: row.positions)
    out_dir = str(tmp_path / "eval")
    proc = subprocess.run([sys.executable, "evaluate.py", "--model", "external", "--positions",
                           positions, "--db", test_db, "--out_dir", out_dir], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {positions}: no conformation for 1 of 3 test rows")
    assert "conf_id" in lines[0]
    assert not os.path.exists(os.path.join(out_dir, "final.db"))


def test_resuming_on_a_reordered_test_db_is_one_clear_error(test_db, tmp_path):
    """Records name test rows by row id. The same molecules in another row order (a db
    remade or rewritten since) must not be resumed: the records would be scored against the
    wrong molecules. The original db resumes with nothing to do."""
    out_dir = str(tmp_path / "eval")
    argv = ["--model", "rdkit", "--out_dir", out_dir, "--oracle_method", METHOD,
            "--n_workers", "2"]
    evaluate.main([*argv, "--db", test_db])
    records_path = os.path.join(out_dir, "per_conformation.jsonl")
    before = open(records_path).read()
    reordered = str(tmp_path / "reordered.db")
    db = data.connect_for_writing(reordered)
    db.metadata = ase.db.connect(test_db).metadata
    for row in reversed(list(ase.db.connect(test_db).select())):
        db.write(row.toatoms(), key_value_pairs=dict(row.key_value_pairs), data=dict(row.data))
    proc = subprocess.run([sys.executable, "evaluate.py", *argv, "--db", reordered], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {records_path}: row 1 was O (3 atoms), but in "
                               f"{reordered} it is N (4 atoms)")
    assert "evaluate into a new --out_dir" in lines[0]
    assert open(records_path).read() == before
    evaluate.main([*argv, "--db", test_db])


# ---------------------------------------------------------------------------------------
# Table 4's D_LM: molecules of 36-57 atoms
# ---------------------------------------------------------------------------------------

def test_size_filter_picks_only_36_to_57_atoms():
    """make_trajectories.py --min_atoms 36 --max_atoms 57 keeps exactly the molecules of
    data/moses_sample.smi that have 36-57 atoms with hydrogens (counted here with RDKit)."""
    from rdkit import Chem
    smi = os.path.join(ROOT, "data", "moses_sample.smi")
    args = make_trajectories.parse_args(["--smiles", smi, "--out", "x.db", "--mode", "optimize",
                                         "--min_atoms", "36", "--max_atoms", "57"])
    lines = make_trajectories.read_smiles_file(smi)
    kept = [s for _, s, _ in lines
            if make_trajectories.in_size_range(make_trajectories.n_atoms_with_hydrogens(s), args)]
    sizes = {s: Chem.AddHs(Chem.MolFromSmiles(s)).GetNumAtoms() for _, s, _ in lines}
    assert kept == [s for _, s, _ in lines if 36 <= sizes[s] <= 57]
    assert 0 < len(kept) < len(lines)            # the file has molecules on both sides
    assert min(sizes.values()) < 36
