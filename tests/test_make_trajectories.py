"""make_trajectories.py end to end, with real Psi4 at HF/STO-3G on tiny molecules."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ase.db
import numpy as np
import pytest

import data
from data import BOHR_TO_ANGSTROM
import make_trajectories
import oracle_pool
import oracles
import painn

METHOD = "hf/sto-3g"
# line 3 is not a molecule RDKit can read; conf_ids are (line number - 1) here
TINY = "O water\nC methane\nC1CC broken_ring\nN\n"


def run(*argv):
    return make_trajectories.main([*argv, "--oracle_method", METHOD, "--n_workers", "2"])


def rows(path):
    return list(ase.db.connect(path).select())


@pytest.fixture(scope="module")
def smiles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("smi") / "tiny.smi"
    path.write_text(TINY)
    return str(path)


@pytest.fixture(scope="module")
def d0(smiles_file, tmp_path_factory):
    """One single_point run, shared: (db path, what it printed to stderr)."""
    out = str(tmp_path_factory.mktemp("d0") / "d0.db")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert run("--smiles", smiles_file, "--mode", "single_point", "--out", out) == 0
    return out, err.getvalue()


def test_single_point_schema_and_values(d0, smiles_file):
    out, stderr = d0
    assert f"{smiles_file} line 3: RDKit cannot parse SMILES 'C1CC'; skipped" in stderr
    db = ase.db.connect(out)
    assert db.metadata["method"] == METHOD and db.metadata["mode"] == "single_point"
    # atomrefs: the free atoms at the oracle's level; STO-3G's H atom is -0.466582 Hartree
    refs = db.metadata["atomrefs"]["energy"]
    assert refs[1] == pytest.approx(-0.466581849, abs=1e-7) and refs[8] < -73 and refs[7] < -53
    assert db.metadata["_property_unit_dict"] == {"energy": "Hartree", "forces": "Hartree/Ang"}
    by_id = {row.conf_id: row for row in db.select()}
    assert sorted(by_id) == [0, 1, 3]
    assert [by_id[i].smiles for i in (0, 1, 3)] == ["O", "C", "N"]
    assert by_id[0].name == "water" and "name" not in by_id[3].key_value_pairs

    confs, atomrefs = data.read_db(out, require_energy=True, require_forces=True, verbose=False)
    assert set(atomrefs) == {1, 6, 7, 8} and atomrefs[1] == refs[1]
    # the conformations are ETKDG's with --seed 42 + line number: a rerun makes the same
    numbers, (positions,) = make_trajectories.embed("O", 1, 42 + 1)
    water = next(c for c in confs if c.smiles == "O")
    np.testing.assert_array_equal(water.numbers, numbers)
    np.testing.assert_allclose(water.positions, positions, atol=1e-12)
    # the labels are a direct oracle call's
    with oracle_pool.LocalOraclePool(METHOD, n_workers=1) as pool:
        direct = [pool.submit(c, c.id).result() for c in confs]
    for conf, result in zip(confs, direct):
        assert conf.energy == pytest.approx(result.energy, abs=1e-9)
        np.testing.assert_allclose(conf.forces, result.forces, atol=1e-7)
    assert water.energy == pytest.approx(-74.96, abs=0.01)


def test_resume_does_only_what_is_missing(d0, smiles_file, tmp_path, capsys):
    out = str(tmp_path / "d0.db")
    shutil.copy(d0[0], out)
    before = {row.conf_id: row for row in rows(out)}
    assert run("--smiles", smiles_file, "--out", out) == 0       # nothing to do
    assert "0 conformations to do, 3 already finished" in capsys.readouterr().out
    assert len(rows(out)) == 3

    # a run killed before methane was written: a rerun computes methane only
    ase.db.connect(out).delete([before[1].id])
    assert run("--smiles", smiles_file, "--out", out) == 0
    assert "1 conformations to do" in capsys.readouterr().out
    after = {row.conf_id: row for row in rows(out)}
    assert sorted(after) == [0, 1, 3]
    assert all(after[i].id == before[i].id for i in (0, 3))       # untouched
    assert after[1].data["energy"][0] == pytest.approx(before[1].data["energy"][0], abs=1e-9)


def test_optimize_writes_steps_and_optima(d0, tmp_path):
    out, optimal = str(tmp_path / "traj.db"), str(tmp_path / "test.db")
    # rows are written as results arrive: find water's place in d0
    index, water = next((i, row) for i, row in enumerate(rows(d0[0])) if row.smiles == "O")
    assert run("--db", d0[0], "--skip_molecules", str(index), "--max_molecules", "1",
               "--mode", "optimize", "--out", out, "--out_optimal", optimal) == 0
    (start,) = rows(optimal)
    assert start.conf_id == water.id and start.converged and start.smiles == "O"
    steps = sorted(rows(out), key=lambda row: row.step)
    assert [row.step for row in steps] == list(range(start.n_steps))
    assert all(row.conf_id == water.id for row in steps)
    energies = [row.data["energy"][0] for row in steps]
    assert start.data["energy"][0] == pytest.approx(energies[0], abs=1e-12)
    assert start.data["optimal_energy"][0] == energies[-1] <= energies[0]
    np.testing.assert_array_equal(start.data["optimal_positions"], steps[-1].positions)
    np.testing.assert_allclose(steps[0].positions, start.positions, atol=1e-9)
    assert np.abs(steps[-1].data["forces"]).max() < 2e-3      # at the minimum
    confs, _ = data.read_db(optimal, verbose=False)
    assert confs[0].optimal_energy == energies[-1]


def test_a_rerun_replaces_a_partial_trajectory(tmp_path):
    """write_trajectory: the steps of a failed optimization are kept until a longer
    trajectory of the same conformation replaces them, in one transaction."""
    db = data.connect_for_writing(str(tmp_path / "traj.db"))
    conf = data.Conformation(np.array([8, 1, 1]), np.zeros((3, 3)), smiles="O")

    def result(n_steps):
        return oracle_pool.OracleResult(
            7, n_steps == 4, "optimize", trajectory_energy=-np.arange(n_steps, dtype=float),
            trajectory_positions=np.zeros((n_steps, 3, 3)),
            trajectory_forces=np.zeros((n_steps, 3, 3)))

    assert make_trajectories.write_trajectory(db, conf, 7, result(2), None) == 2
    assert make_trajectories.write_trajectory(db, conf, 7, result(4), None) == 2
    assert make_trajectories.write_trajectory(db, conf, 7, result(1), None) == 0
    assert sorted(row.step for row in db.select(conf_id=7)) == [0, 1, 2, 3]
    assert make_trajectories.write_trajectory(db, conf, 8, result(4), 1) == 1   # capped
    # D_traj-K leaves out step 0 (the D0 row itself): steps 1-3 of a 4-step optimization
    assert make_trajectories.write_trajectory(db, conf, 9, result(4), None, first_step=1) == 3
    assert sorted(row.step for row in db.select(conf_id=9)) == [1, 2, 3]
    assert make_trajectories.write_trajectory(db, conf, 10, result(1), None, first_step=1) == 0


def test_max_conformations_caps_the_trajectory_rows(smiles_file, tmp_path):
    """D_traj-K: K rows, every one a step t >= 1 (a conformation D0 lacks); the starts and
    optima are all in --out_optimal, as without K."""
    out = str(tmp_path / "traj.db")
    assert run("--smiles", smiles_file, "--max_molecules", "2", "--mode", "optimize",
               "--out", out, "--max_conformations", "3") == 0
    assert len(rows(out)) == 3 and all(row.step >= 1 for row in rows(out))
    optimal = rows(str(tmp_path / "traj_optimal.db"))
    assert len(optimal) == 2                                     # both optimizations ran
    assert all("optimal_positions" in row.data for row in optimal)


def test_a_rerun_of_a_finished_d_traj_starts_no_optimization(d0, tmp_path):
    """D_traj-2 from 3 D0 rows with one worker (two jobs in flight): the first
    optimization's steps fill it, so the third never starts, on the run or on a rerun."""
    out, optimal = str(tmp_path / "traj.db"), str(tmp_path / "traj_optimal.db")
    argv = ["--db", d0[0], "--mode", "optimize", "--max_conformations", "2", "--out", out,
            "--oracle_method", METHOD, "--n_workers", "1"]
    assert make_trajectories.main(argv) == 0
    first = [(row.conf_id, row.positions.tolist()) for row in rows(out)]
    n_optimized = len(rows(optimal))
    assert len(first) == 2 and n_optimized == 2
    assert make_trajectories.main(argv) == 0
    assert len(rows(optimal)) == n_optimized
    assert [(row.conf_id, row.positions.tolist()) for row in rows(out)] == first


def rows_written_so_far(path):
    """Rows of a db another process is writing; none while it is still creating its tables
    (ASE makes them and its metadata in steps: a reader in between gets 'no such table' or
    an error from inside ASE's initialisation, depending on where it lands)."""
    try:
        return rows(path) if os.path.exists(path) else []
    except Exception:          # not readable yet; the assertions below read it for real
        return []


def test_kill_9_loses_no_finished_result(tmp_path):
    """kill -9 the script once its first result is written; a rerun finishes the rest."""
    smi = tmp_path / "four.smi"
    smi.write_text("O\nC\nN\nCO\n")
    out = str(tmp_path / "d0.db")
    argv = ["--smiles", str(smi), "--out", out, "--oracle_method", METHOD, "--n_workers", "1"]
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "make_trajectories.py")
    process = subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 180                 # Psi4 starts slowly beside other tests
        while time.monotonic() < end and not rows_written_so_far(out):
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    first = rows(out)
    assert 1 <= len(first) < 4 and all(row.data["forces"].shape[1] == 3 for row in first)
    assert make_trajectories.main(argv) == 0
    assert sorted(row.conf_id for row in rows(out)) == [0, 1, 2, 3]


def test_failures_are_recorded_and_retried(smiles_file, tmp_path, capsys):
    out = str(tmp_path / "d0.db")
    args = ("--smiles", smiles_file, "--max_molecules", "1", "--out", out)
    # every conformation failed: exit status 1; a timeout is not permanent: rerun it
    assert run(*args, "--oracle_timeout", "0.05", "--oracle_retries", "0") == 1
    captured = capsys.readouterr()
    assert "1 x timeout" in captured.out and "rerun the same command" in captured.out
    assert "warning: no atomrefs" in captured.err            # the atom jobs timed out too
    assert rows(out) == [] and "atomrefs" not in ase.db.connect(out).metadata
    (record,) = [json.loads(line) for line in open(out + ".failures.jsonl")]
    assert record["conf_id"] == 0 and record["smiles"] == "O"
    assert record["reason"].startswith("timeout") and record["attempts"] == 1

    assert run(*args) == 0                                        # the rerun retries it
    assert ase.db.connect(out).metadata["atomrefs"]["energy"][8] < -73   # and fills these in
    (row,) = rows(out)
    assert row.conf_id == 0 and row.data["energy"][0] == pytest.approx(-74.96, abs=0.01)


def test_mmff_mode_labels_mmff_minima(tmp_path):
    smi = tmp_path / "ester.smi"
    smi.write_text("CCOC(C)=O ethyl_acetate\n")
    out = str(tmp_path / "rdkit.db")
    assert run("--smiles", str(smi), "--mode", "mmff", "--out", out) == 0
    (conf,), _ = data.read_db(out, require_forces=True, verbose=False)
    numbers, (etkdg,) = make_trajectories.embed("CCOC(C)=O", 1, 42 + 1)
    mmff = oracles.MMFFSurrogate(conf)
    assert mmff.energy(conf.positions) < mmff.energy(etkdg) - 1.0     # kcal/mol
    assert conf.info["conf_id"] == 0 and conf.energy < -200


def test_bad_input_is_one_error_line(smiles_file, d0, tmp_path, capsys):
    assert make_trajectories.main(["--smiles", str(tmp_path / "none.smi"),
                                   "--out", str(tmp_path / "x.db")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.smi: no such SMILES file")
    out = str(tmp_path / "d0.db")
    shutil.copy(d0[0], out)
    assert make_trajectories.main(["--smiles", smiles_file, "--out", out,
                                   "--oracle_method", "hf/3-21g"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert "made with --oracle_method hf/sto-3g, not hf/3-21g" in errors[0]


def test_filters_that_leave_no_molecule_are_an_error_before_any_output(tmp_path, capsys):
    """App. D's size range leaves 1210 of the 5000 molecules of data/moses_sample.smi: a
    --skip_molecules past them, or a range none is in, is one error line, and nothing is
    written; fewer than --max_molecules is said at once, then labelled."""
    smiles = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "data", "moses_sample.smi")
    argv = ["--smiles", smiles, "--min_atoms", "17", "--max_atoms", "35", "--max_molecules",
            "40", "--out", str(tmp_path / "x.db"), "--oracle_method", "gfn2-xtb"]
    assert make_trajectories.main([*argv, "--skip_molecules", "3000"]) == 2
    captured = capsys.readouterr()
    assert captured.out == (f"{smiles}: 5000 molecules read, 1210 with 17-35 atoms, 0 taken "
                            "(--skip_molecules 3000, --max_molecules 40)\n")
    assert captured.err == (f"error: {smiles}: no molecules to label: --skip_molecules 3000 "
                            "skips all 1210 with 17-35 atoms; use a --skip_molecules below "
                            "1210\n")
    assert make_trajectories.main([*argv, "--min_atoms", "1", "--max_atoms", "3"]) == 2
    assert capsys.readouterr().err == (f"error: {smiles}: no molecules to label: none of its "
                                       "5000 has 1-3 atoms; change --min_atoms / "
                                       "--max_atoms\n")
    assert os.listdir(tmp_path) == []
    assert make_trajectories.main([*argv, "--skip_molecules", "1208"]) == 0
    captured = capsys.readouterr()
    assert f"{smiles}: 5000 molecules read, 1210 with 17-35 atoms, 2 taken" in captured.out
    assert captured.err.splitlines()[0] == (f"warning: {smiles}: only 2 molecules left to "
                                            "take, not the --max_molecules 40 asked")
    assert len(rows(str(tmp_path / "x.db"))) == 2


def test_nabladft_level_gets_nabladft_atomrefs_without_a_job(tmp_path):
    args = make_trajectories.parse_args(["--smiles", "x.smi", "--out", str(tmp_path / "x.db"),
                                         "--oracle_method", "wB97X-D/def2-SVP",
                                         "--dask_scheduler", "tcp://127.0.0.1:1"])
    assert make_trajectories.atomrefs_for(args, {1, 6}) == painn.NABLADFT_ATOMREFS


def test_atom_count_filter_keeps_molecules_in_range_before_skip_and_max(tmp_path):
    # with hydrogens: water 3, methane 5, ammonia 4 atoms; line 3 does not parse (passes)
    smi = tmp_path / "sizes.smi"
    smi.write_text(TINY)
    args = make_trajectories.parse_args(["--smiles", str(smi), "--out", "x.db",
                                         "--min_atoms", "4", "--max_atoms", "5"])
    kept = [line for line in make_trajectories.read_smiles_file(str(smi))
            if make_trajectories.in_size_range(
                make_trajectories.n_atoms_with_hydrogens(line[1]), args)]
    assert [name for _, _, name in kept] == ["methane", "broken_ring", None]
    args.max_molecules = 1
    assert make_trajectories.selected(kept, args)[0][2] == "methane"


def test_gfn2_xtb_single_points_and_optimizations(smiles_file, tmp_path):
    """--oracle_method gfn2-xtb in both oracle modes: xTB's labels, atomrefs with Hund's
    spin, every BFGS step a row, optima under the max-force criterion."""
    xtb = ["--oracle_method", "gfn2-xtb", "--n_workers", "2"]
    d0 = str(tmp_path / "d0.db")
    with contextlib.redirect_stderr(io.StringIO()):
        assert make_trajectories.main(["--smiles", smiles_file, "--mode", "single_point",
                                       "--out", d0, *xtb]) == 0
    db = ase.db.connect(d0)
    assert db.metadata["method"] == "gfn2-xtb"
    refs = data.read_atomrefs(db.metadata)
    assert refs[1] == pytest.approx(-0.393482764, abs=1e-8)      # GFN2-xTB's H atom
    assert set(refs) == {1, 6, 7, 8} and all(-5 < e < 0 for e in refs.values())
    confs, _ = data.read_db(d0, require_energy=True, require_forces=True, verbose=False)
    assert sorted(c.smiles for c in confs) == ["C", "N", "O"]
    for conf in confs:
        energy, gradient = oracles.xtb_gradient("gfn2-xtb", conf.numbers, conf.positions, 0,
                                                1, {})
        assert conf.energy == pytest.approx(energy, abs=1e-9)
        np.testing.assert_allclose(conf.forces, -gradient / BOHR_TO_ANGSTROM, atol=1e-8)

    out, optimal = str(tmp_path / "traj.db"), str(tmp_path / "opt.db")
    assert make_trajectories.main(["--db", d0, "--mode", "optimize", "--out", out,
                                   "--out_optimal", optimal, *xtb]) == 0
    optima = {row.conf_id: row for row in rows(optimal)}
    assert len(optima) == 3 and all(row.converged for row in optima.values())
    for conf_id, start in optima.items():
        steps = sorted((row for row in rows(out) if row.conf_id == conf_id),
                       key=lambda row: row.step)
        assert [row.step for row in steps] == list(range(start.n_steps)) and len(steps) >= 2
        energies = [row.data["energy"][0] for row in steps]
        assert start.data["optimal_energy"][0] == energies[-1] < energies[0]
        largest_force = np.linalg.norm(steps[-1].data["forces"], axis=1).max()
        assert largest_force < oracles.XTB_MAX_FORCE / BOHR_TO_ANGSTROM
        np.testing.assert_array_equal(start.data["optimal_positions"], steps[-1].positions)
def test_butina_keeps_centroids_of_the_fewest_clusters_covering_95_percent():
    # rigid benzene: every ETKDG conformation in one cluster, one centroid
    numbers, kept, n = make_trajectories.butina_centroids("c1ccccc1", 20, 7, 1.25, 0.95)
    assert n == 20 and len(kept) == 1 and len(numbers) == 12
    # flexible dodecane at 1 A: several clusters; the kept ones are the largest first, just
    # enough to hold 95 % of the 50 conformations
    mol = make_trajectories.etkdg_molecule("CCCCCCCCCCCC", 50, 43)
    clusters = make_trajectories.butina_clusters(mol, 1.0)
    sizes = [len(c) for c in clusters]
    assert sum(sizes) == 50 and sizes == sorted(sizes, reverse=True) and len(sizes) > 3
    n_kept = int(np.searchsorted(np.cumsum(sizes), 0.95 * 50)) + 1   # fewest that cover 95 %
    assert sum(sizes[:n_kept]) >= 47.5 > sum(sizes[:n_kept - 1])
    _, kept, _ = make_trajectories.butina_centroids("CCCCCCCCCCCC", 50, 43, 1.0, 0.95)
    assert len(kept) == n_kept < 50
    positions = [c.GetPositions() for c in mol.GetConformers()]
    for centroid, cluster in zip(kept, clusters):
        np.testing.assert_array_equal(centroid, positions[cluster[0]])
    # every member of a cluster lies within the threshold of its centroid
    from rdkit import Chem
    from rdkit.Chem import rdMolAlign
    heavy = Chem.RemoveHs(mol)
    for cluster in clusters[:n_kept]:
        for member in cluster[1:]:
            assert rdMolAlign.GetBestRMS(Chem.Mol(heavy), Chem.Mol(heavy),
                                         member, cluster[0]) <= 1.0 + 1e-9
    # seeded: the same again
    _, again, _ = make_trajectories.butina_centroids("CCCCCCCCCCCC", 50, 43, 1.0, 0.95)
    assert all(np.array_equal(a, b) for a, b in zip(kept, again))


def butina_water_butanol(tmp_path):
    """make_trajectories.py arguments (ending in --out OUT) of App. D's Butina selection of
    water and butanol, 10 ETKDG conformations each; and OUT."""
    smi = tmp_path / "two.smi"
    smi.write_text("O water\nCCCCO butanol\n")
    out = str(tmp_path / "d0.db")
    return ("--smiles", str(smi), "--conformer_selection", "butina", "--n_etkdg", "10",
            "--butina_threshold", "0.3", "--out", out), out


def test_butina_selection_end_to_end_ids_and_resume(tmp_path, capsys):
    argv, out = butina_water_butanol(tmp_path)
    assert run(*argv) == 0
    expected = make_trajectories.butina_centroids("CCCCO", 10, 42 + 2, 0.3, 0.95)[1]
    by_id = {row.conf_id: row for row in rows(out)}
    assert sorted(by_id) == [0] + [10 + k for k in range(len(expected))] and len(expected) > 1
    for k, positions in enumerate(expected):
        np.testing.assert_allclose(by_id[10 + k].positions, positions, atol=1e-12)
    assert [row.conf_id for row in rows(out)] == sorted(by_id)            # canonical order
    assert ase.db.connect(out).metadata["conformer_selection"] == "butina"
    capsys.readouterr()
    assert run(*argv) == 0                                                 # resume: nothing
    assert f"0 conformations to do, {len(by_id)} already finished" in capsys.readouterr().out
    assert run(*argv[:-2], "--butina_threshold", "0.5", "--out", out) == 2   # other clusters


def test_butina_rerun_of_a_finished_selection_does_not_embed_again(tmp_path, monkeypatch):
    """A finished run records its lines and centroid conf_ids in the db's metadata; the same
    command again has nothing to embed. Other lines (or a db missing a centroid) embed."""
    argv, out = butina_water_butanol(tmp_path)
    assert run(*argv) == 0
    ids = [row.conf_id for row in rows(out)]
    assert ase.db.connect(out).metadata["butina_selection"] == {"lines": [1, 2], "conf_ids": ids}
    embedded = []
    real = make_trajectories.butina_conformations
    monkeypatch.setattr(make_trajectories, "butina_conformations",
                        lambda args, lines: embedded.append(len(lines)) or real(args, lines))
    assert run(*argv) == 0 and embedded == []                  # the same lines: nothing to do
    assert [row.conf_id for row in rows(out)] == ids
    db = ase.db.connect(out)
    db.delete([next(db.select(conf_id=ids[-1])).id])           # a centroid lost: embed again
    assert run(*argv) == 0 and embedded == [2]
    assert [row.conf_id for row in rows(out)] == ids
    assert run(*argv, "--max_molecules", "1") == 0 and embedded == [2, 1]   # other lines


def test_same_command_twice_gives_identical_dbs(tmp_path):
    """2 workers, results arriving in any order: the dbs read back identical, and D_traj-K
    (from D0's own rows, shuffled) is the first K steps of the head of that order."""
    smi = tmp_path / "four.smi"
    smi.write_text("O\nC\nN\nCO\n")

    def read(path):
        db = ase.db.connect(path)
        return [(dict(row.key_value_pairs), row.numbers.tolist(), row.positions.tolist(),
                 {k: np.asarray(v).tolist() for k, v in row.data.items()})
                for row in db.select()], db.metadata

    made = []
    for attempt in ("a", "b"):
        os.makedirs(tmp_path / attempt)
        d0, traj = str(tmp_path / attempt / "d0.db"), str(tmp_path / attempt / "traj.db")
        assert run("--smiles", str(smi), "--out", d0) == 0
        assert run("--db", d0, "--shuffle", "--mode", "optimize", "--max_conformations", "7",
                   "--out", traj) == 0
        made.append([read(d0), read(traj), read(traj.replace(".db", "_optimal.db"))])
    assert made[0] == made[1]
    (d0_rows, _), (traj_rows, _), (optimal_rows, _) = made[0]
    assert [keys["conf_id"] for keys, *_ in d0_rows] == [0, 1, 2, 3]
    assert len(traj_rows) == 7
    ids = [(keys["conf_id"], keys["step"]) for keys, *_ in traj_rows]
    assert ids == sorted(ids)
    # the head of the shuffled order holds the trajectories: all steps but the last one's
    order = [int(i) + 1 for i in np.random.default_rng(42).permutation(4)]   # D0 row ids
    steps = {row[0]["conf_id"]: row[0]["n_steps"] for row in optimal_rows}
    head, n = [], 0
    for conf_id in order:
        if n >= 7:
            break
        head.append(conf_id)
        n += steps[conf_id] - 1            # steps 1 .. n_steps - 1: step 0 is the D0 row
    assert sorted({i for i, _ in ids}) == sorted(head)
    assert all(step >= 1 for _, step in ids)
    assert all(keys["source_conf_id"] == keys["conf_id"] - 1 for keys, *_ in traj_rows)


def test_mmff_mode_skips_what_mmff_did_not_converge(tmp_path, capsys):
    smi = tmp_path / "chain.smi"
    smi.write_text("CCCCCCCCO octanol\n")
    out = str(tmp_path / "rdkit.db")
    # its only conformation failed: the run exits non-zero (every conformation failed)
    assert run("--smiles", str(smi), "--mode", "mmff", "--mmff_max_iters", "2",
               "--out", out) == 1
    assert rows(out) == []
    (record,) = [json.loads(line) for line in open(out + ".failures.jsonl")]
    assert record["reason"].startswith("MMFF did not converge in 2 iterations")
    numbers, (etkdg,) = make_trajectories.embed("CCCCCCCCO", 1, 42 + 1)
    conf = data.Conformation(numbers, etkdg, smiles="CCCCCCCCO")
    assert oracles.mmff_minimize_checked(conf, 2)[1] is False
    assert oracles.mmff_minimize_checked(conf)[1] is True           # MMFF_MAX_ITERS = 1000


def test_rewrite_sorted_puts_rows_in_key_order_and_keeps_everything(tmp_path):
    path = str(tmp_path / "x.db")
    db = data.connect_for_writing(path, method="m")
    for conf_id, step in ((2, 1), (1, 0), (2, 0)):          # the order results arrived in
        conf = data.Conformation(np.array([1, 1]), np.full((2, 3), conf_id + 0.1 * step),
                                 energy=-1.0 - conf_id, forces=np.full((2, 3), step * 1.0))
        data.write_conformation(db, conf, conf_id=conf_id, step=step, name="h2")
    assert data.rewrite_sorted(path, make_trajectories.canonical_key)
    db = ase.db.connect(path)
    got = [(row.id, row.conf_id, row.step, row.name, row.positions[0, 0],
            row.data["energy"][0], row.data["forces"][0, 0]) for row in db.select()]
    assert got == [(1, 1, 0, "h2", 1.0, -2.0, 0.0), (2, 2, 0, "h2", 2.0, -3.0, 0.0),
                   (3, 2, 1, "h2", pytest.approx(2.1), -3.0, 1.0)]
    assert db.metadata["method"] == "m" and os.listdir(tmp_path) == ["x.db"]   # no temporary db
    assert not data.rewrite_sorted(path, make_trajectories.canonical_key)   # already sorted


def test_atomrefs_come_from_the_input_db_made_at_the_same_level(d0, tmp_path):
    args = make_trajectories.parse_args(["--db", d0[0], "--out", str(tmp_path / "t.db"),
                                         "--oracle_method", METHOD, "--mode", "optimize",
                                         "--dask_scheduler", "tcp://127.0.0.1:1"])
    refs = data.read_atomrefs(ase.db.connect(d0[0]).metadata)
    assert make_trajectories.atomrefs_for(args, {1, 8}) == refs     # no job: no scheduler


class DelayedOptimizer:
    """Control flow only (the real-Psi4 test above checks the chemistry): an 'optimization'
    of conf_id c has 2 + c % 3 steps, and results arrive after seeded random delays."""

    def __init__(self, seed, n_parallel=3):
        self.rng, self.n_parallel, self.submitted = np.random.default_rng(seed), n_parallel, []

    def submit(self, conf, conf_id, kind="gradient"):
        import threading
        from concurrent.futures import Future
        self.submitted.append(conf_id)
        n = 2 + conf_id % 3
        result = oracle_pool.OracleResult(
            conf_id, True, kind, energy=-1.0, forces=np.zeros((conf.n_atoms, 3)),
            trajectory_positions=np.stack([conf.positions + 0.01 * t for t in range(n)]),
            trajectory_energy=-1.0 - 0.1 * np.arange(n),
            trajectory_forces=np.zeros((n, conf.n_atoms, 3)), converged=True)
        future = Future()
        threading.Timer(float(self.rng.uniform(0, 0.05)), future.set_result, [result]).start()
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_the_k_cut_takes_the_head_of_the_order_whatever_arrives_first(tmp_path, monkeypatch):
    src = data.connect_for_writing(str(tmp_path / "d0.db"), atomrefs={1: -0.5, 8: -75.0},
                                   method=METHOD)             # its atomrefs are reused
    for i in range(8):
        data.write_conformation(src, data.Conformation(
            np.array([8, 1, 1]), np.random.default_rng(i).normal(size=(3, 3)), energy=-75.0,
            forces=np.zeros((3, 3)), smiles="O"), conf_id=i)
    got = []
    for seed in (0, 1):
        pool = DelayedOptimizer(seed)
        monkeypatch.setattr(make_trajectories.oracle_pool, "make_oracle_pool",
                            lambda args, journal=None: pool)
        out = str(tmp_path / f"traj{seed}.db")
        assert run("--db", str(tmp_path / "d0.db"), "--shuffle", "--mode", "optimize",
                   "--max_conformations", "10", "--out", out) == 0
        got.append([(row.conf_id, row.step, row.positions.tolist()) for row in rows(out)])
    assert got[0] == got[1] and len(got[0]) == 10
    order = [int(i) + 1 for i in np.random.default_rng(42).permutation(8)]   # row ids
    expected, n = [], 0
    for conf_id in order:                      # whole trajectories, the last one cut at 10
        for step in range(1, 2 + conf_id % 3):   # step 0, the D0 row itself, is not added
            if n < 10:
                expected.append((conf_id, step))
                n += 1
    assert [(c, s) for c, s, _ in got[0]] == sorted(expected)


def test_opt_coordinates_reach_optking_and_the_metadata(d0, tmp_path, capsys):
    """--opt_coordinates: Cartesian (App. D, the default) and redundant internals take
    other paths from the same start to the same HF/STO-3G minimum of water; the choice is in
    the metadata, and a rerun with the other one into the same db is refused. Psi4's step
    cap is a safety cap of 1000 (Sec. 3 optimizes to convergence)."""
    index = next(i for i, row in enumerate(rows(d0[0])) if row.smiles == "O")
    made = {}
    for coordinates in ("cartesian", "redundant"):
        out, optimal = str(tmp_path / f"{coordinates}.db"), str(tmp_path / f"{coordinates}_opt.db")
        extra = [] if coordinates == "cartesian" else ["--opt_coordinates", coordinates]
        assert run("--db", d0[0], "--skip_molecules", str(index), "--max_molecules", "1",
                   "--mode", "optimize", "--out", out, "--out_optimal", optimal, *extra) == 0
        assert ase.db.connect(out).metadata["opt_coordinates"] == coordinates
        (start,) = rows(optimal)
        assert start.converged
        made[coordinates] = (start.data["optimal_energy"][0],
                             sorted(rows(out), key=lambda row: row.step))
    (e_cart, cart), (e_red, red) = made["cartesian"], made["redundant"]
    assert e_cart == pytest.approx(e_red, abs=2e-6)                # one minimum
    np.testing.assert_allclose(cart[0].positions, red[0].positions, atol=1e-9)   # one start
    assert np.abs(cart[1].positions - red[1].positions).max() > 1e-3   # two paths
    assert run("--db", d0[0], "--skip_molecules", str(index), "--max_molecules", "1",
               "--mode", "optimize", "--out", str(tmp_path / "cartesian.db"),
               "--out_optimal", str(tmp_path / "cartesian_opt.db"),
               "--opt_coordinates", "redundant") == 2
    assert "made with --opt_coordinates cartesian, not redundant" in capsys.readouterr().err
    args = make_trajectories.parse_args(["--db", d0[0], "--out", "x.db", "--mode", "optimize",
                                         "--oracle_method", METHOD, "--n_workers", "1"])
    with oracle_pool.make_oracle_pool(args) as pool:
        assert pool.settings["max_opt_steps"] == 1000
        assert pool.settings["opt_coordinates"] == "cartesian"
    with pytest.raises(SystemExit):                   # xTB's BFGS is Cartesian only
        make_trajectories.parse_args(["--db", d0[0], "--out", "x.db", "--mode", "optimize",
                                      "--oracle_method", "gfn2-xtb",
                                      "--opt_coordinates", "redundant"])
