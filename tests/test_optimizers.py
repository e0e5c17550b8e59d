"""optimizers.py: the batched L-BFGS / Adam / SGD follow torch.optim run per molecule, and
every molecule of a batch follows exactly the trajectory it follows alone."""
import argparse

import pytest
import torch

import optimizers
from optimizers import BatchedAdam, BatchedLBFGS, BatchedSGD, make_optimizer


# ------------------------------------------------------------------ a smooth test energy
def toy_energy_and_forces(positions, batch, anchors, n_slots):
    """Per molecule: harmonic bonds between consecutive atoms, a Gaussian repulsion between
    the other pairs, and a weak tether of every atom to its own anchor point (so that each
    molecule has a distinct minimum). positions [n, 3], batch [n], anchors [n, 3]
    -> energy [n_slots], forces [n, 3]. Analytic forces, accumulated with index_add in
    pair order, so a molecule gets bit-identical numbers alone or in any batch."""
    n = len(positions)
    ar = torch.arange(n)
    same = (batch[:, None] == batch[None, :]) & (ar[:, None] < ar[None, :])
    i, j = torch.nonzero(same, as_tuple=True)                 # pairs of one molecule, i < j
    r_vec = positions[j] - positions[i]                        # [n_pairs, 3]
    r = torch.linalg.vector_norm(r_vec, dim=1)
    bonded = j == i + 1
    gauss = torch.exp(-0.5 * r ** 2)
    e_pair = torch.where(bonded, 1.0 * (r - 1.5) ** 2, 0.5 * gauss)
    de_dr = torch.where(bonded, 2.0 * (r - 1.5), -0.5 * r * gauss)
    f_j = -(de_dr / r)[:, None] * r_vec                        # force on j from the pair
    forces = torch.zeros_like(positions)
    forces.index_add_(0, j, f_j)
    forces.index_add_(0, i, -f_j)
    diff = positions - anchors
    forces = forces - 0.1 * diff
    energy = torch.zeros(n_slots, dtype=positions.dtype)
    energy.index_add_(0, batch[i], e_pair)
    energy.index_add_(0, batch, 0.05 * (diff ** 2).sum(1))
    return energy, forces


def random_molecule(n, gen, noise=1.0):
    """Anchors on a random walk with 1.5 A steps, start = anchors + noise."""
    steps = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    anchors = torch.cumsum(1.5 * steps / steps.norm(dim=1, keepdim=True), 0)
    start = anchors + noise * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return start, anchors


def molecules(sizes, seed=0, noise=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [random_molecule(n, gen, noise) for n in sizes]


def flat(mols):
    pos = torch.cat([m[0] for m in mols])
    batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m[0]) for m in mols]))
    return pos, batch


class Counter:
    """energy_and_forces of an optimizer's current layout; counts batched calls."""

    def __init__(self, opt, anchors_per_slot):
        self.opt, self.anchors, self.calls, self.seen = opt, anchors_per_slot, 0, []

    def __call__(self, pos):
        self.calls += 1
        self.seen.append((pos.clone(), self.opt.batch.clone()))
        anchors = self.opt.concat_slots(self.anchors)
        return toy_energy_and_forces(pos, self.opt.batch, anchors, self.opt.n_slots)


def torch_reference(opt_factory, start, anchors, n_steps):
    """torch.optim run on one molecule, closure as in the official GOLF code
    (returns the energy, sets X.grad = -forces). Positions after each step, evaluations."""
    X = start.clone().requires_grad_(True)
    opt = opt_factory([X])
    zeros = torch.zeros(len(start), dtype=torch.long)
    evals = [0]

    def closure():
        evals[0] += 1
        energy, forces = toy_energy_and_forces(X.detach(), zeros, anchors, 1)
        X.grad = -forces
        return energy[0]

    traj, n_evals = [], []
    for _ in range(n_steps):
        if isinstance(opt, torch.optim.LBFGS):
            opt.step(closure)
        else:
            opt.zero_grad()
            closure()
            opt.step()
        traj.append(X.detach().clone())
        n_evals.append(evals[0])
    return traj, n_evals


def run_batched(opt, mols, n_steps):
    f = Counter(opt, [m[1] for m in mols])
    traj, evals = [], []
    for _ in range(n_steps):
        opt.step(f)
        traj.append([opt.slot_positions(k) for k in range(len(mols))])
        evals.append(opt.n_evals.clone())
    return traj, evals, f


SIZES = [3, 30, 7, 12, 20, 5, 16]


# ------------------------------------------------------------------ L-BFGS
def test_lbfgs_matches_torch_per_molecule():
    mols = molecules(SIZES, seed=1)
    pos, batch = flat(mols)
    opt = BatchedLBFGS(pos, batch, grad_threshold=0.0)          # never flag converged
    traj, evals, f = run_batched(opt, mols, 20)
    saw_early_exit = False
    for k, (start, anchors) in enumerate(mols):
        ref, ref_evals = torch_reference(
            lambda p: torch.optim.LBFGS(p, lr=1, max_iter=5, history_size=100), start, anchors, 20)
        for step in range(20):
            assert torch.allclose(traj[step][k], ref[step], rtol=0, atol=1e-8), (k, step)
            assert int(evals[step][k]) == ref_evals[step], (k, step)
        saw_early_exit |= ref_evals[-1] < 20 * 5
    assert saw_early_exit            # the tolerance exits were exercised, not only max_iter
    assert f.calls <= 20 * 5         # one batched call per inner evaluation


def test_lbfgs_history_cap_and_start_at_minimum():
    """history_size 3 (the memory is shifted many times), and a molecule that starts at its
    minimum (torch returns at once: max|g| <= tolerance_grad)."""
    mols = molecules([9, 4, 14], seed=2)
    start, anchors = mols[1]
    X = start.clone().requires_grad_(True)
    lb = torch.optim.LBFGS([X], lr=1, max_iter=100, tolerance_grad=1e-12, tolerance_change=0)
    zeros = torch.zeros(4, dtype=torch.long)

    def closure():
        e, fo = toy_energy_and_forces(X.detach(), zeros, anchors, 1)
        X.grad = -fo
        return e[0]
    for _ in range(5):
        lb.step(closure)
    mols[1] = (X.detach().clone(), anchors)
    assert toy_energy_and_forces(mols[1][0], zeros, anchors, 1)[1].abs().max() < 1e-7

    pos, batch = flat(mols)
    opt = BatchedLBFGS(pos, batch, history_size=3, grad_threshold=0.0)
    traj, evals, _ = run_batched(opt, mols, 12)
    for k, (start, anchors) in enumerate(mols):
        ref, ref_evals = torch_reference(
            lambda p: torch.optim.LBFGS(p, lr=1, max_iter=5, history_size=3), start, anchors, 12)
        for step in range(12):
            assert torch.allclose(traj[step][k], ref[step], rtol=0, atol=1e-8), (k, step)
            assert int(evals[step][k]) == ref_evals[step]
    assert [int(e[1]) for e in evals] == list(range(1, 13))   # one evaluation, no move
    assert torch.equal(traj[-1][1], mols[1][0])


def test_results_of_slots_not_evaluating_are_ignored():
    """A caller may evaluate only `opt.evaluating` slots: NaN for the others changes nothing."""
    mols = molecules(SIZES, seed=1)
    full, full_evals, _ = run_batched(BatchedLBFGS(*flat(mols), grad_threshold=1e-4), mols, 20)
    opt = BatchedLBFGS(*flat(mols), grad_threshold=1e-4)
    f = Counter(opt, [m[1] for m in mols])
    skipped = 0
    for step in range(20):
        def subset(pos):
            energy, forces = f(pos)
            skip = ~opt.evaluating
            nonlocal skipped
            skipped += int((skip & opt.active).sum())
            return energy.masked_fill(skip, float("nan")), forces.masked_fill(skip[opt.batch, None], float("nan"))
        opt.step(subset)
        assert torch.equal(opt.n_evals, full_evals[step])
        for k in range(len(mols)):
            assert torch.equal(opt.slot_positions(k), full[step][k])
    assert skipped > 0 and opt.converged.any()


def test_together_equals_alone_bitwise():
    mols = molecules([25, 6], seed=3)
    for make in [lambda p, b: BatchedLBFGS(p, b), lambda p, b: BatchedAdam(p, b),
                 lambda p, b: BatchedSGD(p, b)]:
        together, _, _ = run_batched(make(*flat(mols)), mols, 15)
        for k in range(2):
            alone, _, _ = run_batched(make(*flat([mols[k]])), [mols[k]], 15)
            for step in range(15):
                assert torch.equal(together[step][k], alone[step][0])


def test_replace_slot_keeps_other_trajectories():
    mols = molecules([10, 8, 12], seed=4)
    new = molecules([40], seed=5)[0]           # bigger than all: the padded rows grow
    ref, _, _ = run_batched(BatchedLBFGS(*flat(mols)), mols, 12)

    opt = BatchedLBFGS(*flat(mols))
    anchors = [m[1] for m in mols]
    f = Counter(opt, anchors)
    for step in range(12):
        if step == 5:
            opt.replace(1, new[0])
            anchors[1] = new[1]
            assert int(opt.n_atoms[1]) == 40 and int(opt.n_evals[1]) == 0
            assert opt.positions.shape == (10 + 40 + 12, 3)
            assert torch.equal(opt.batch, torch.repeat_interleave(torch.arange(3),
                                                                  torch.tensor([10, 40, 12])))
        opt.step(f)
        for k in (0, 2):
            assert torch.equal(opt.slot_positions(k), ref[step][k])
    # the new molecule follows the trajectory it follows alone from a fresh optimizer
    alone, _, _ = run_batched(BatchedLBFGS(*flat([new])), [new], 7)
    assert torch.equal(opt.slot_positions(1), alone[-1][0])

    # deactivate: the slot leaves the layout and stops; the others go on unchanged
    opt.deactivate(1)
    frozen = opt.slot_positions(1)
    assert opt.positions.shape == (22, 3) and not opt.active[1]
    opt.step(f)
    assert torch.equal(opt.slot_positions(1), frozen)
    assert torch.equal(opt.concat_slots([torch.full((m,), k) for k, m in enumerate([10, 40, 12])]),
                       torch.tensor([0] * 10 + [2] * 12))


def test_converged_flag_stops_molecule():
    mols = molecules([6, 15], seed=6)
    opt = BatchedLBFGS(*flat(mols), grad_threshold=1e-3)
    f = Counter(opt, [m[1] for m in mols])
    for _ in range(40):
        before = [opt.slot_positions(k) for k in range(2)]
        was_converged = opt.converged.clone()
        evals = opt.n_evals.clone()
        opt.step(f)
        for k in range(2):
            if was_converged[k]:
                assert torch.equal(opt.slot_positions(k), before[k])
                assert opt.n_evals[k] == evals[k]
    assert opt.converged.all()
    for k in range(2):
        _, forces = toy_energy_and_forces(opt.slot_positions(k), torch.zeros(len(mols[k][0]), dtype=torch.long), mols[k][1], 1)
        assert forces.abs().max() < 1e-2

    # Adam / SGD: the evaluation of s_t says converged -> no update in that step
    for cls in (BatchedAdam, BatchedSGD):
        opt = cls(*flat(mols), grad_threshold=1e9)
        start = opt.positions
        opt.step(Counter(opt, [m[1] for m in mols]))
        assert opt.converged.all() and torch.equal(opt.positions, start)


def test_max_step_caps_every_update():
    mols = molecules([5, 18], seed=7, noise=3.0)
    for opt in [BatchedLBFGS(*flat(mols), max_step=0.05), BatchedAdam(*flat(mols), lr=0.5, max_step=0.05),
                BatchedSGD(*flat(mols), lr=0.5, max_step=0.05)]:
        f = Counter(opt, [m[1] for m in mols])
        largest = 0.0
        for _ in range(10):
            f.seen.clear()
            opt.step(f)
            points = [p for p, _ in f.seen] + [opt.positions]   # all evaluations, then s_{t+1}
            for a, b in zip(points[:-1], points[1:]):
                largest = max(largest, float((b - a).norm(dim=1).max()))
        assert 0.04 < largest <= 0.05 + 1e-12


def test_first_update_scaling():
    """The first-ever update is -g * min(1, 1/|g|_1) * lr; later steps use lr."""
    (start, anchors), = molecules([8], seed=8, noise=2.0)
    zeros = torch.zeros(8, dtype=torch.long)
    _, forces = toy_energy_and_forces(start, zeros, anchors, 1)
    assert forces.abs().sum() > 1.0
    opt = BatchedLBFGS(start, zeros, lr=0.7, max_iter=1)
    opt.step(lambda p: toy_energy_and_forces(p, zeros, anchors, 1))
    expected = start + forces * (0.7 / forces.abs().sum())
    assert torch.allclose(opt.positions, expected, rtol=0, atol=1e-14)
    assert float(opt.t[0]) == pytest.approx(0.7 / float(forces.abs().sum()), rel=1e-14)
    # small gradient: min(1, 1/|g|_1) = 1
    opt = BatchedLBFGS(start, zeros, lr=0.7, max_iter=1)
    opt.step(lambda p: [t * 1e-3 for t in toy_energy_and_forces(p, zeros, anchors, 1)])
    assert torch.allclose(opt.positions, start + 0.7e-3 * forces, rtol=0, atol=1e-14)


def test_model_dtype_and_state_dtype():
    mols = molecules([5, 7], seed=9)
    opt = BatchedLBFGS(*flat(mols), model_dtype=torch.float32)
    dtypes = []

    def f(pos):
        dtypes.append(pos.dtype)
        e, fo = toy_energy_and_forces(pos.double(), opt.batch, opt.concat_slots([m[1] for m in mols]), 2)
        return e.float(), fo.float()
    opt.step(f)
    assert set(dtypes) == {torch.float32}
    assert opt.positions.dtype == torch.float64 and opt.old_dirs.dtype == torch.float64


# ------------------------------------------------------------------ Adam and SGD
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_adam_sgd_match_torch_with_slot_reset(name):
    mols = molecules([4, 22, 9], seed=10)
    new = molecules([13], seed=11)[0]
    factory = {"adam": lambda p: torch.optim.Adam(p, lr=5e-3),
               "sgd": lambda p: torch.optim.SGD(p, lr=5e-3, momentum=0.9)}[name]
    opt = make_optimizer(name, *flat(mols), grad_threshold=0.0)
    anchors = [m[1] for m in mols]
    f = Counter(opt, anchors)
    traj = []
    for step in range(30):
        if step == 15:
            opt.replace(2, new[0])
            anchors[2] = new[1]
        opt.step(f)
        traj.append([opt.slot_positions(k) for k in range(3)])
    assert f.calls == 30 and opt.n_evals.tolist() == [30, 30, 15]
    for k in range(3):
        ref, _ = torch_reference(factory, *mols[k], 30)
        last = 15 if k == 2 else 30
        for step in range(last):
            assert torch.allclose(traj[step][k], ref[step], rtol=0, atol=1e-10), (k, step)
    ref, _ = torch_reference(factory, *new, 15)
    for step in range(15):
        assert torch.allclose(traj[15 + step][2], ref[step], rtol=0, atol=1e-10)


def test_make_optimizer_and_args():
    args = optimizers.add_optimizer_args(argparse.ArgumentParser()).parse_args([])
    assert (args.conf_opt, args.conf_opt_lr, args.max_iter, args.lbfgs_history,
            args.max_step, args.grad_threshold) == ("lbfgs", None, 5, 100, None, 1e-5)
    pos, batch = flat(molecules([3, 4]))
    opt = optimizers.optimizer_from_args(args, pos, batch, n_slots=4)
    assert isinstance(opt, BatchedLBFGS) and opt.lr == 1.0 and opt.max_iter == 5
    assert opt.active.tolist() == [True, True, False, False]
    assert isinstance(make_optimizer("adam", pos, batch), BatchedAdam)
    assert make_optimizer("sgd", pos, batch).lr == 5e-3
    with pytest.raises(ValueError):
        make_optimizer("bfgs", pos, batch)
