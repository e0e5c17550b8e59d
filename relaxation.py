"""The batched NNP-relaxation engine: Eq. 3 of GOLF (Tsypin et al., ICLR 2024) on many molecules.

    s_{t+1} = Opt(s_t, F(s_t)),     F(s) = -dE/dX,  E = f(z, X; theta)             (Eq. 3)

A Relaxation holds n_slots slots, each a molecule that the NNP f moves down its energy
surface with its own optimizer state: the paper's L-BFGS (Table 5), or Adam or SGD with
momentum (Table 6), built by optimizers.optimizer_from_args from the --conf_opt flags.
step() moves every active slot by one optimizer step, and each energy evaluation within it
is one NNP call on the flat layout: the atoms of every active slot, slots in order
(optimizers.py's layout). When its caller decides that a molecule is done, it puts the
next one in that slot (fill) or leaves the slot empty (empty); the other slots go on
untouched, so molecules of any size, each at its own step, share one batch. The callers:

    golf.py      Algorithm 1's trajectories (line 5): a slot ends on an MMFF rise or at T
                 (line 7) and starts again from s_0 ~ D (line 12)
    evaluate.py  the test conformations, T steps each, E and F kept at the eval steps
    relax.py     FmaxRelaxation: a molecule is done at max_i |F_i| <= --fmax (ASE's stop)
                 or after --steps steps, both checked at every evaluation

    engine = Relaxation(model, args, n_slots, whole_layout=True)
    engine.fill(k, numbers, positions)  a molecule in slot k: atomic numbers [n_k], s_0
                                        [n_k, 3]; fresh optimizer state, opt.n_steps[k] = 0
    engine.empty(k)                     slot k leaves the layout (its positions stay readable)
    engine.step()                       s_t -> s_{t+1} for every active, unconverged slot
    engine.evaluate()                   E [n_slots], F [n_atoms, 3] at the current positions
                                        of the layout, one NNP call
    engine.positions(k)                 [n_k, 3] float64 numpy: slot k's current positions
    engine.slot_rows(values, k)         [n_k, ...] float64 numpy: slot k's rows of a layout
                                        tensor (e.g. evaluate()'s forces)
    engine.moving(k), engine.can_move() active and not converged: slot k, any slot
    engine.opt                          the optimizers.BatchedOptimizer; per slot [n_slots]:
                                        active, converged, n_steps, energy, ...
    engine.numbers, engine.z            each slot's atomic numbers [n_k]; the layout's [n_atoms]

    engine = FmaxRelaxation(model, args, n_slots, fmax, max_steps)
    engine.fill(k, numbers, positions, max_step)   the same, with slot k's update cap (A)
    engine.finished, engine.energy_start, engine.end   per slot: see the class

Units are the model's: Angstrom, Hartree, Hartree/A. The model runs in --dtype on --device;
the optimizer's state is float64 on --device too.

whole_layout: each NNP call evaluates every atom of the layout (golf.py, evaluate.py), or
(False) only the atoms of the slots whose results the optimizer uses (opt.evaluating), with
zero forces for the others: the later evaluations of an L-BFGS step skip the molecules that
left their inner loop (FmaxRelaxation). A molecule's numbers can differ in the last bits
with the other molecules of an NNP call, so the two agree to rounding.
"""
import math

import torch

import optimizers


class Relaxation:
    """n_slots molecules optimized by the NNP `model`, each in its own slot (see above)."""

    def __init__(self, model, args, n_slots, whole_layout=True):
        self.model, self.whole_layout = model, whole_layout
        self.device = torch.device(args.device)
        no_atoms = torch.zeros(0, dtype=torch.long, device=self.device)
        self.opt = optimizers.optimizer_from_args(                        # every slot empty
            args, torch.zeros(0, 3, dtype=torch.float64, device=self.device), no_atoms,
            n_slots, model_dtype=getattr(torch, args.dtype))
        self.numbers = [no_atoms] * n_slots          # atomic numbers of each slot [n_k]
        self.z = no_atoms                            # of the layout [n_atoms]

    # ---- slots ----------------------------------------------------------------------

    def fill(self, k, numbers, positions):
        """Slot k starts molecule `numbers` [n_k] at s_0 = positions [n_k, 3] (Angstrom)."""
        self.opt.replace(k, torch.tensor(positions, dtype=torch.float64, device=self.device))
        self.numbers[k] = torch.tensor(numbers, dtype=torch.long, device=self.device)
        self.z = self.opt.concat_slots(self.numbers)

    def empty(self, k):
        """Slot k leaves the layout; positions(k) still reads where it ended."""
        if bool(self.opt.active[k]):
            self.opt.deactivate(k)
            self.z = self.opt.concat_slots(self.numbers)

    def positions(self, k):
        return self.opt.slot_positions(k).cpu().numpy()

    def slot_rows(self, values, k):
        return values[self.opt.batch == k].double().cpu().numpy()

    def moving(self, k):
        return bool(self.opt.active[k]) and not bool(self.opt.converged[k])

    def can_move(self):
        return bool((self.opt.active & ~self.opt.converged).any())

    # ---- Eq. 3 ----------------------------------------------------------------------

    def step(self):
        """s_t -> s_{t+1} = Opt(s_t, F(s_t)) for every active slot that has not converged."""
        self.opt.step(self.energy_and_forces)

    def energy_and_forces(self, positions):
        """E [n_slots] and F [n_atoms, 3] at positions [n_atoms, 3] of the layout (model
        dtype): one NNP call, on every atom or (whole_layout False) on the atoms of the
        slots being evaluated, zero forces for the others."""
        if self.whole_layout:
            return self.nnp(self.z, positions, self.opt.batch)
        keep = self.opt.evaluating[self.opt.batch]                         # [n_atoms]
        energy, forces_kept = self.nnp(self.z[keep], positions[keep], self.opt.batch[keep])
        forces = torch.zeros_like(positions)
        forces[keep] = forces_kept.to(positions.dtype)
        return energy, forces

    def evaluate(self):
        """E [n_slots] and F [n_atoms, 3] of every active slot at its current positions."""
        positions = self.opt.positions.to(self.opt.model_dtype)
        return self.nnp(self.z, positions, self.opt.batch)

    def nnp(self, z, positions, batch):
        energy, forces = self.model(z, positions, batch, self.opt.n_slots)
        return energy.detach(), forces.detach()


class FmaxRelaxation(Relaxation):
    """A Relaxation whose molecules stop by ASE's criterion (relax.py). At every evaluation,
    a molecule whose largest atomic force max_i |F_i| is at most fmax (Hartree/A), or whose
    numbers are no longer finite, and at the first evaluation of a step, at E(s_t) and
    F(s_t), one that took max_steps steps, is finished: its forces go to the optimizer as
    zeros, so the optimizer leaves it where it is (grad_threshold 0: zero forces are its
    converged state). Its result is that evaluation's geometry, E and max_i |F_i|. Each
    NNP call is on the atoms of the slots being evaluated (whole_layout False), and each
    slot has its own update cap (opt.max_step [n_slots], Angstrom), given to fill().

    Per slot, since its last fill: finished [n_slots] bool, energy_start [n_slots] E(s_0)
    (Hartree), end [n_slots, 3] where it finished: E, max_i |F_i|, steps taken."""

    def __init__(self, model, args, n_slots, fmax, max_steps):
        super().__init__(model, args, n_slots, whole_layout=False)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.fmax, self.max_steps = fmax, max_steps
        self.opt.grad_threshold = 0.0
        self.opt.max_step = torch.full((n_slots,), math.inf, **f64)          # [S]
        self.energy_start = torch.full((n_slots,), math.nan, **f64)           # [S]
        self.end = torch.full((n_slots, 3), math.nan, **f64)                  # [S, 3]
        self.finished = torch.zeros(n_slots, dtype=torch.bool, device=self.device)
        self.first_evaluation = False

    def fill(self, k, numbers, positions, max_step=math.inf):
        super().fill(k, numbers, positions)
        self.opt.max_step[k] = max_step
        self.energy_start[k] = self.end[k] = math.nan
        self.finished[k] = False

    def step(self):
        self.first_evaluation = True                  # E(s_t), F(s_t) of every moving slot
        super().step()

    def energy_and_forces(self, positions):
        energy, forces = super().energy_and_forces(positions)     # [S], [n_atoms, 3]
        ev, batch, S = self.opt.evaluating, self.opt.batch, self.opt.n_slots
        atom_force = torch.linalg.vector_norm(forces.double(), dim=1)       # |F_i| [n_atoms]
        bad_atom = ~(torch.isfinite(atom_force) & torch.isfinite(positions).all(1))
        bad = self.end.new_zeros(S).index_add_(0, batch, bad_atom.double()) > 0
        bad |= ~torch.isfinite(energy)                                       # [S]
        largest = self.end.new_zeros(S).scatter_reduce_(
            0, batch, atom_force.nan_to_num(math.inf), "amax")             # max_i |F_i| [S]
        stop = ev & (bad | (largest <= self.fmax))
        if self.first_evaluation:          # opt.n_steps: the steps done before this one
            self.first_evaluation = False
            self.energy_start = torch.where(ev & (self.opt.n_steps == 0), energy,
                                            self.energy_start)
            stop |= ev & (self.opt.n_steps >= self.max_steps)
        now = torch.stack([energy, largest, self.opt.n_steps.double()], 1)    # [S, 3]
        self.end = torch.where(stop[:, None], now, self.end)
        self.finished |= stop
        forces[stop[batch]] = 0.0                     # the optimizer leaves them in place
        return energy, forces
