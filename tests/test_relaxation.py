"""relaxation.Relaxation: slots filled, emptied and refilled; every molecule follows the
trajectory it follows alone, whatever shares the batch; both evaluation modes."""
import argparse

import numpy as np
import pytest
import torch

import optimizers
import relaxation


class Wells(torch.nn.Module):
    """A stand-in NNP: E = sum_i z_i |x_i - c|^4 per molecule (c = 0.1 z_i (1, 1, 1))."""

    def forward(self, z, positions, batch, n_molecules):
        d = positions - 0.1 * z[:, None].to(positions.dtype)
        r2 = (d ** 2).sum(1)
        energy = torch.zeros(n_molecules, dtype=torch.float64).index_add(
            0, batch, (z * r2 ** 2).double())
        return energy, -4 * (z * r2)[:, None] * d


def engine(n_slots, *flags, whole_layout=True):
    """Slots that never count as converged (grad_threshold -1): every one moves each step."""
    parser = optimizers.add_optimizer_args(argparse.ArgumentParser())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64")
    args = parser.parse_args(["--grad_threshold", "-1", *flags])
    return relaxation.Relaxation(Wells(), args, n_slots, whole_layout=whole_layout)


MOLECULES = [(np.array(z), np.random.default_rng(i).normal(size=(len(z), 3)))
             for i, z in enumerate(([1, 6, 8], [1, 1], [7, 6, 6, 1, 1], [8, 1, 1, 1]))]


def alone(numbers, positions, steps, *flags):
    e = engine(1, *flags)
    e.fill(0, numbers, positions)
    for _ in range(steps):
        e.step()
    return e.positions(0)


@pytest.mark.parametrize("flags", [(), ("--conf_opt", "adam"), ("--max_iter", "3")])
@pytest.mark.parametrize("whole_layout", [True, False])
def test_refilled_slots_follow_their_own_trajectories(flags, whole_layout):
    """Two slots: molecule 0 for 6 steps, then molecule 2 in its slot for 4; molecule 1 for
    10 steps beside them; molecule 3 fills the slot that molecule 1 leaves at step 5 (the
    slot was empty for a step). Each ends exactly where it ends alone."""
    e = engine(2, *flags, whole_layout=whole_layout)
    e.fill(0, *MOLECULES[0])
    e.fill(1, *MOLECULES[1])
    ends = {}
    for t in range(1, 11):
        e.step()
        if t == 6:
            ends[0] = e.positions(0)
            e.fill(0, *MOLECULES[2])
        if t == 4:
            ends[1] = e.positions(1)
            e.empty(1)
            assert np.array_equal(e.positions(1), ends[1])       # readable when empty
            assert not e.moving(1) and e.moving(0) and e.can_move()
            assert e.z.tolist() == MOLECULES[0][0].tolist()       # the layout: slot 0 only
        if t == 5:
            e.fill(1, *MOLECULES[3])
    ends[2], ends[3] = e.positions(0), e.positions(1)
    assert e.opt.n_steps.tolist() == [4, 5]
    for i, steps in ((0, 6), (1, 4), (2, 4), (3, 5)):
        assert np.array_equal(ends[i], alone(*MOLECULES[i], steps, *flags)), i


def test_evaluate_gives_energy_and_forces_at_the_current_positions():
    e = engine(3)
    for k in (0, 2):
        e.fill(k, *MOLECULES[k])
    e.step()
    energy, forces = e.evaluate()
    ref_e, ref_f = Wells()(e.z, torch.tensor(np.concatenate([e.positions(0), e.positions(2)])),
                           torch.tensor([0] * 3 + [2] * 5), 3)
    assert torch.equal(energy, ref_e) and energy[1] == 0
    assert np.array_equal(e.slot_rows(forces, 2), ref_f[3:].numpy())
