"""Batched, per-molecule optimizers for NNP-optimization (Eq. 3 of GOLF, Tsypin et al. 2024).

GOLF moves every conformation down the energy surface of the neural network potential (NNP):

    s_{t+1} = Opt(s_t, F(s_t))            F = -dE/dX, E = f(z, X; theta)

with L-BFGS (the paper's choice, Table 5: rate 1.0, at most 5 inner iterations) or, in
Appendix B (Table 6), Adam or SGD with momentum (rate 5e-3). The official code keeps one
`torch.optim.LBFGS` per molecule; here one object optimizes a whole batch of molecules of
different sizes, with ONE batched NNP call per inner evaluation, and every molecule follows
exactly the trajectory it would follow alone (per-molecule state, per-molecule reductions).

Batch layout (shared with the rest of the repo)
-----------------------------------------------
A batch of molecules is flat atoms plus a molecule index:

    positions [n_atoms, 3]  Angstrom
    batch     [n_atoms]     slot index of every atom (long); atoms of a slot are contiguous

The optimizer owns `n_slots` slots. The flat layout it hands out is "the atoms of every
active slot, slots in increasing order, each slot's atoms in their original order".

    energy_and_forces(positions [n_atoms, 3]) -> (energy [n_slots], forces [n_atoms, 3])

is the caller's function: it evaluates the NNP on the WHOLE current layout in one call,
e.g. `lambda pos: model(z, pos, opt.batch, opt.n_slots)` with `z = opt.concat_slots(z_list)`
rebuilt whenever slots are replaced or deactivated. Energies of inactive slots are ignored.
Positions are passed in `model_dtype`; everything the optimizer keeps is float64, on the
device of the initial positions (results of energy_and_forces are moved there).
During a call, `opt.evaluating` [n_slots] bool tells which slots' results will be used
(an L-BFGS molecule that left its inner loop early is not); a caller may evaluate only
those atoms (`keep = opt.evaluating[opt.batch]`) and return zeros for the others.

API
---
    opt = BatchedLBFGS(positions, batch, n_slots=None, *, lr=1.0, max_iter=5, max_eval=None,
                       tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100,
                       grad_threshold=1e-5, max_step=None, model_dtype=None)
    opt = BatchedAdam(positions, batch, n_slots=None, *, lr=5e-3, betas=(0.9, 0.999),
                      eps=1e-8, grad_threshold=1e-5, max_step=None, model_dtype=None)
    opt = BatchedSGD(positions, batch, n_slots=None, *, lr=5e-3, momentum=0.9,
                     grad_threshold=1e-5, max_step=None, model_dtype=None)
    opt = make_optimizer(name, positions, batch, n_slots, lr=None, max_iter=5, history=100,
                         max_step=None, grad_threshold=1e-5, model_dtype=None)
    add_optimizer_args(parser)        # --conf_opt --conf_opt_lr --max_iter --lbfgs_history
                                      # --max_step --grad_threshold --optimizer_preset
    args = parse_args_with_preset(parser, argv)   # Table 6's values unless given explicitly

    opt.step(energy_and_forces)       # s_t -> s_{t+1} for every active, unconverged slot
    opt.replace(k, positions_k)       # new molecule [n_k, 3] in slot k, fresh state, active
    opt.deactivate(k)                 # slot k leaves the layout (its last positions are kept)
    opt.positions                     # [n_atoms, 3] float64, current flat layout
    opt.batch                         # [n_atoms] slot of every atom of the layout
    opt.slot_positions(k)             # [n_k, 3] float64 (also for a deactivated slot)
    opt.concat_slots(per_slot)        # cat per-slot tensors (e.g. atomic numbers) in layout order
    opt.active, opt.converged         # [n_slots] bool
    opt.evaluating                    # [n_slots] bool, slots the current evaluation is for
    opt.n_atoms                       # [n_slots] long, atoms of each slot
    opt.n_steps, opt.n_evals          # [n_slots] long: steps taken / energy evaluations since
                                      #   the slot was (re)filled
    opt.energy                        # [n_slots] float64, E(s_t) from the first evaluation of
                                      #   the last step (nan before any step)
    opt.forces                        # [n_atoms, 3] float64, F(s_t) from that same evaluation

Convergence: a slot is `converged` when the largest force component of its last evaluation
in a step is <= grad_threshold (the official code: `done = flat_grad.abs().max() <=
grad_threshold` after `optimizer.step`). A converged slot is not moved or counted any more;
it stays in the layout until the caller replaces or deactivates it.

max_step (default None = off, the paper): if the largest atom displacement |dX_i| of one
update of a molecule exceeds max_step (Angstrom), that whole update is scaled down to it.
"""
import argparse

import torch

# Per-molecule vectors are stored padded in rows of [n_slots, 3 * max_atoms]. Row lengths
# are rounded up to a multiple of PAD_ATOMS atoms (3 * 16 = 48 doubles, a multiple of the
# SIMD block torch sums over), so a row reduction (dot product, norm) gives bit-identical
# results whatever the padding: a molecule follows exactly the same trajectory alone, with
# others, or after a bigger molecule made the rows grow.
PAD_ATOMS = 16


def _dot(a, b):
    """Per-molecule dot product of padded rows: [S, D], [S, D] -> [S]."""
    return torch.linalg.vecdot(a, b, dim=-1)


class BatchedOptimizer:
    """Slots, flat layout <-> padded rows, force evaluation. Subclasses define step()."""

    def __init__(self, positions, batch, n_slots=None, *, grad_threshold=1e-5, max_step=None,
                 model_dtype=None):
        if positions.ndim != 2 or positions.shape[1] != 3 or batch.shape != positions.shape[:1]:
            raise ValueError("expected positions [n_atoms, 3] and batch [n_atoms]")
        batch = batch.to(device=positions.device, dtype=torch.long)
        if batch.numel() and (batch[1:] < batch[:-1]).any():
            raise ValueError("batch must be non-decreasing (slots in order, atoms contiguous)")
        if n_slots is None:
            n_slots = int(batch.max()) + 1 if batch.numel() else 0
        if batch.numel() and int(batch.max()) >= n_slots:
            raise ValueError(f"batch has a slot index >= n_slots={n_slots}")
        self.n_slots = S = n_slots
        self.device = positions.device
        self.model_dtype = model_dtype or positions.dtype
        self.grad_threshold = grad_threshold
        self.max_step = max_step

        f64 = dict(dtype=torch.float64, device=self.device)
        i64 = dict(dtype=torch.long, device=self.device)
        self.active = torch.zeros(S, dtype=torch.bool, device=self.device)
        self.converged = torch.zeros(S, dtype=torch.bool, device=self.device)
        self.n_atoms = torch.zeros(S, **i64)
        self.n_steps = torch.zeros(S, **i64)
        self.n_evals = torch.zeros(S, **i64)
        self.energy = torch.full((S,), float("nan"), **f64)
        self.evaluating = torch.zeros(S, dtype=torch.bool, device=self.device)
        self.x = torch.zeros(S, 0, **f64)         # positions, padded rows [S, D], D = 3 * max_atoms
        self.f0 = torch.zeros(S, 0, **f64)        # forces at s_t (first evaluation of a step)
        self._init_state()                        # optimizer state tensors of the subclass

        sizes = torch.bincount(batch, minlength=S)
        self._grow(int(sizes.max()) if S else 0)
        for k, pos_k in zip(range(S), torch.split(positions, sizes.tolist())):
            if len(pos_k):
                self._fill(k, pos_k)
        self._build_layout()

    # ---------------------------------------------------------------- state kept per slot
    def _init_state(self):
        """Create the subclass' state tensors (rows of length D = 0 here, grown by _grow)."""
        self._padded = ["x", "f0"]               # names of tensors whose last dim is D

    def _reset_state(self, k):
        """Fresh optimizer state for slot k."""

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self):
        """Every slot's positions and optimizer state (tensors, and the thresholds a caller
        may have changed), enough to go on exactly where it stopped."""
        state = {name: value.clone() for name, value in vars(self).items()
                 if torch.is_tensor(value)}
        state["grad_threshold"] = self.grad_threshold
        return state

    def load_state_dict(self, state):
        """Take back a state_dict() of an optimizer made with the same settings."""
        for name, value in state.items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(self.device))
        self.grad_threshold = state["grad_threshold"]
        self.n_slots = len(self.active)
        self._build_layout()

    # ---------------------------------------------------------------- slots
    def replace(self, k, positions_k):
        """Put a new molecule (positions_k [n_k, 3]) in slot k with a fresh optimizer state.
        Other slots' states are untouched; the flat layout is rebuilt."""
        self._grow(len(positions_k))
        self._fill(k, positions_k)
        self._build_layout()

    def deactivate(self, k):
        """Take slot k out of the layout. Its positions stay readable (slot_positions)."""
        self.active[k] = False
        self._build_layout()

    def _fill(self, k, positions_k):
        n = len(positions_k)
        self.x[k] = 0.0
        self.x[k, : 3 * n] = positions_k.detach().reshape(-1).to(torch.float64)
        self.f0[k] = 0.0
        self.n_atoms[k] = n
        self.active[k] = True
        self.converged[k] = False
        self.n_steps[k] = 0
        self.n_evals[k] = 0
        self.energy[k] = float("nan")
        self._reset_state(k)

    def _grow(self, n_atoms):
        """Make the padded rows long enough for a molecule of n_atoms (zeros keep values)."""
        D_new = 3 * (-(-n_atoms // PAD_ATOMS) * PAD_ATOMS)
        D = self.x.shape[-1]
        if D_new <= D:
            return
        for name in self._padded:
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:-1], D_new)
            new[..., :D] = old
            setattr(self, name, new)

    def _build_layout(self):
        """Flat layout: active slots in order. Precompute the element index of every flat
        coordinate in the padded rows, so that flat <-> padded is one gather / scatter."""
        sizes = torch.where(self.active, self.n_atoms, 0)                   # [S]
        slots = torch.arange(self.n_slots, device=self.device)
        self.batch = torch.repeat_interleave(slots, sizes)                   # [n_atoms]
        first = torch.cumsum(sizes, 0) - sizes                               # [S]
        local = torch.arange(len(self.batch), device=self.device) - first[self.batch]
        D = self.x.shape[-1]
        self._index = ((self.batch * D + 3 * local)[:, None]
                       + torch.arange(3, device=self.device))                # [n_atoms, 3]

    def concat_slots(self, per_slot):
        """Concatenate per-slot tensors (a list of n_slots tensors [n_k, ...], e.g. atomic
        numbers) in the order of the flat layout (empty when no slot is active)."""
        active = torch.nonzero(self.active)[:, 0].tolist()
        return torch.cat([per_slot[k] for k in active]) if active else per_slot[0][:0]

    def _to_flat(self, rows):
        """Padded rows [S, D] -> flat [n_atoms, 3]."""
        return rows.reshape(-1)[self._index]

    @property
    def positions(self):
        return self._to_flat(self.x)

    @property
    def forces(self):
        return self._to_flat(self.f0)

    def slot_positions(self, k):
        return self.x[k, : 3 * int(self.n_atoms[k])].view(-1, 3).clone()

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, energy_and_forces):
        """One batched NNP call on the whole layout -> E [S], g = -F [S, D], both float64."""
        energy, forces = energy_and_forces(self.positions.to(self.model_dtype))
        if energy.shape != (self.n_slots,) or forces.shape != self._index.shape:
            raise ValueError(f"energy_and_forces returned energy {tuple(energy.shape)} and "
                             f"forces {tuple(forces.shape)}, expected ({self.n_slots},) and "
                             f"{tuple(self._index.shape)}")
        g = torch.zeros_like(self.x)
        g.view(-1)[self._index] = -forces.detach().to(self.device, torch.float64)
        return energy.detach().to(self.device, torch.float64), g

    def _start_step(self, energy_and_forces):
        """Slots to move and the first evaluation of a step, F(s_t). None if nothing moves."""
        running = self.active & ~self.converged
        if not bool(running.any()):
            return None
        self.evaluating = running
        energy, g = self._evaluate(energy_and_forces)
        self.energy = torch.where(running, energy, self.energy)
        self.f0 = torch.where(running[:, None], -g, self.f0)
        self.n_evals += running
        self.n_steps += running
        return running, energy, g

    def _start_first_order_step(self, energy_and_forces):
        """_start_step for one-evaluation optimizers (Adam, SGD): slots whose max |F| is at
        the threshold are marked converged and stay. -> (moving [S], g = -F [S, D]) or None."""
        start = self._start_step(energy_and_forces)
        if start is None:
            return None
        running, _, g = start
        conv = running & (g.abs().amax(1) <= self.grad_threshold)
        self.converged |= conv
        return running & ~conv, g

    def _move(self, moving, update):
        """x += update [S, D] for the moving slots, capped at --max_step per atom if set."""
        if self.max_step is not None:
            update = update * self._max_step_scale(update)[:, None]
        self.x = torch.where(moving[:, None], self.x + update, self.x)

    def _max_step_scale(self, update):
        """Factor [S] (<= 1) so that no atom of a molecule moves more than max_step."""
        S, D = update.shape
        largest = torch.linalg.vector_norm(update.view(S, D // 3, 3), dim=-1).amax(-1)  # [S]
        return torch.where(largest > self.max_step, self.max_step / largest, 1.0)

    def step(self, energy_and_forces):
        raise NotImplementedError


class BatchedLBFGS(BatchedOptimizer):
    """torch.optim.LBFGS (line_search_fn=None), one independent instance per slot, batched.

    Per slot, one step() is exactly one `torch.optim.LBFGS.step(closure)` of the official
    code: evaluate f, g at s_t; up to max_iter updates x += t d, each followed by an
    evaluation except after the last; the memory (d, t, old_dirs, old_stps, ro, H_diag,
    prev_flat_grad, prev_loss, n_iter) carries over to the next step. All branches of
    torch's loop (first-update scaling, curvature skip, history cap, the gradient,
    step-size, energy-change and max_eval exits) are decided per molecule.
    """

    def __init__(self, positions, batch, n_slots=None, *, lr=1.0, max_iter=5, max_eval=None,
                 tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100,
                 grad_threshold=1e-5, max_step=None, model_dtype=None):
        self.lr = lr
        self.max_iter = max_iter
        self.max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.history_size = history_size
        super().__init__(positions, batch, n_slots, grad_threshold=grad_threshold,
                         max_step=max_step, model_dtype=model_dtype)

    def _init_state(self):
        super()._init_state()
        S, H = self.n_slots, self.history_size
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n_iter = torch.zeros(S, dtype=torch.long, device=self.device)  # state['n_iter']
        self.d = torch.zeros(S, 0, **f64)               # last direction           [S, D]
        self.t = torch.zeros(S, **f64)                  # last step length         [S]
        self.prev_flat_grad = torch.zeros(S, 0, **f64)  # g before the last update [S, D]
        self.prev_loss = torch.zeros(S, **f64)          # E before the last update [S]
        self.H_diag = torch.ones(S, **f64)              # initial inverse Hessian scale
        # curvature pairs y = g_{k+1} - g_k, s = x_{k+1} - x_k. torch keeps lists, oldest
        # first, and pops the oldest when full. Here the vectors sit in a ring of H entries
        # per slot (the oldest at hist_start; a full ring overwrites its oldest entry instead
        # of shifting H rows); the small per-entry numbers are kept oldest first ("age
        # order"). Unused entries are zero with ro = 0, so they are exact no-ops.
        self.old_dirs = torch.zeros(S, H, 0, **f64)     # y, ring order            [S, H, D]
        self.old_stps = torch.zeros(S, H, 0, **f64)     # s, ring order            [S, H, D]
        self.ro = torch.zeros(S, H, **f64)              # 1 / (y . s), age order   [S, H]
        # the two-loop's coefficients in age order (see _lbfgs_direction), diagonal unused:
        #   upper, j > i: ro_i s_i . y_j        lower, j < i: ro_i y_i . s_j
        self.coef = torch.zeros(S, H, H, **f64)         # [S, H, H]
        self.hist_len = torch.zeros(S, dtype=torch.long, device=self.device)
        self.hist_start = torch.zeros(S, dtype=torch.long, device=self.device)
        self._padded += ["d", "prev_flat_grad", "old_dirs", "old_stps"]

    def _reset_state(self, k):
        for name in ["n_iter", "d", "t", "prev_flat_grad", "prev_loss", "old_dirs",
                     "old_stps", "ro", "coef", "hist_len", "hist_start"]:
            getattr(self, name)[k] = 0
        self.H_diag[k] = 1.0

    def _age_order(self):
        """Ring entry of the i-th oldest pair of every slot, [S, H]."""
        H = self.history_size
        return (self.hist_start[:, None] + torch.arange(H, device=self.device)) % H

    def _push(self, y, s, ys, push):
        """Append the curvature pair (y, s) to the memory of the slots `push` [S], dropping
        the oldest pair when the memory is full. No host sync: all slots are computed, and
        the others' rows are written back unchanged."""
        S, H = self.n_slots, self.history_size
        rows = torch.arange(S, device=self.device)
        full = self.hist_len == H
        ring = torch.where(full, self.hist_start, self.hist_start + self.hist_len) % H  # [S]
        pm = push[:, None]
        self.old_dirs[rows, ring] = torch.where(pm, y, self.old_dirs[rows, ring])
        self.old_stps[rows, ring] = torch.where(pm, s, self.old_stps[rows, ring])
        shift = (push & full)[:, None]                   # age order: drop the oldest
        self.ro[:, :-1] = torch.where(shift, self.ro[:, 1:], self.ro[:, :-1])
        self.coef[:, :-1, :-1] = torch.where(shift[..., None], self.coef[:, 1:, 1:],
                                             self.coef[:, :-1, :-1])
        self.hist_start = torch.where(push & full, (self.hist_start + 1) % H, self.hist_start)
        self.hist_len = torch.where(push, (self.hist_len + 1).clamp(max=H), self.hist_len)
        new = self.hist_len - 1                          # age of the new pair (if pushed)
        self.ro[rows, new] = torch.where(push, 1.0 / ys, self.ro[rows, new])
        # s_i . y_new for every entry i (the new one included), in age order; it gives both
        # the new column (upper: ro_i s_i . y_new) and the new row (lower: ro_new y_new . s_j)
        s_y = _dot(self.old_stps, y[:, None, :]).gather(1, self._age_order())    # [S, H]
        self.coef[rows, :, new] = torch.where(pm, self.ro * s_y, self.coef[rows, :, new])
        self.coef[rows, new, :] = torch.where(pm, self.ro[rows, new, None] * s_y,
                                              self.coef[rows, new, :])

    def _lbfgs_direction(self, g, update):
        """For slots `update` [S]: add the curvature pair (y, s) of the last update to the
        memory if y.s > 1e-10 and return d = -H g by the two-loop recursion [S, D]
        (rows of other slots are computed too, and must be ignored).

        torch.optim.LBFGS's two loops (entries i = 0..m-1, oldest first)
            q = -g;  for i = m-1..0: al_i = ro_i s_i.q,  q -= al_i y_i
            r = H_diag q;  for i = 0..m-1: be_i = ro_i y_i.r,  r += (al_i - be_i) s_i
        are, written out, two unit-triangular systems in the coefficients kept by _push,
        so each loop is one batched triangular solve instead of m dependent steps:
            al_i + sum_{j>i} ro_i (s_i.y_j) al_j = ro_i s_i.q0,              q0 = -g
            c_i  + sum_{j<i} ro_i (y_i.s_j) c_j  = al_i - ro_i y_i.r0,        c = al - be
        with q = q0 - sum_i al_i y_i, r0 = H_diag q, d = r0 + sum_i c_i s_i."""
        y = g - self.prev_flat_grad                                          # [S, D]
        s = self.d * self.t[:, None]                                         # [S, D]
        ys = _dot(y, s)                                                      # [S]
        push = update & (ys > 1e-10)
        self._push(y, s, ys, push)
        self.H_diag = torch.where(push, ys / _dot(y, y), self.H_diag)

        order = self._age_order()                                            # [S, H]
        q0 = g.neg()
        s_q = _dot(self.old_stps, q0[:, None, :]).gather(1, order)          # s_i . q0 [S, H]
        al = torch.linalg.solve_triangular(self.coef, (self.ro * s_q)[..., None], upper=True,
                                           unitriangular=True)[..., 0]       # [S, H]
        al_ring = torch.zeros_like(al).scatter_(1, order, al)
        q = q0 - torch.bmm(al_ring[:, None, :], self.old_dirs)[:, 0]         # [S, D]
        r = q * self.H_diag[:, None]                                         # H_0 = H_diag I
        y_r = _dot(self.old_dirs, r[:, None, :]).gather(1, order)           # y_i . r0 [S, H]
        c = torch.linalg.solve_triangular(self.coef, (al - self.ro * y_r)[..., None],
                                          upper=False, unitriangular=True)[..., 0]
        c_ring = torch.zeros_like(c).scatter_(1, order, c)
        return r + torch.bmm(c_ring[:, None, :], self.old_stps)[:, 0]

    @torch.no_grad()
    def step(self, energy_and_forces):
        start = self._start_step(energy_and_forces)
        if start is None:
            return
        running, loss, g = start                  # loss [S] and g = -F [S, D] at s_t
        # torch: `if flat_grad.abs().max() <= tolerance_grad: return orig_loss`
        iterating = running & (g.abs().amax(1) > self.tolerance_grad)
        n = 0
        while n < self.max_iter and bool(iterating.any()):
            n += 1
            self.n_iter += iterating

            # ---- direction: steepest descent on the first-ever iteration, else L-BFGS
            first = iterating & (self.n_iter == 1)
            d = self._lbfgs_direction(g, iterating & ~first)
            d = torch.where(first[:, None], -g, d)
            it = iterating[:, None]
            self.d = torch.where(it, d, self.d)
            self.prev_flat_grad = torch.where(it, g, self.prev_flat_grad)
            self.prev_loss = torch.where(iterating, loss, self.prev_loss)

            # ---- step length: lr, the first-ever update scaled by min(1, 1/|g|_1)
            inv_l1 = 1.0 / g.abs().sum(1)
            t = torch.where(first, torch.where(inv_l1 < 1.0, inv_l1, 1.0) * self.lr, self.lr)
            if self.max_step is not None:
                t = t * self._max_step_scale(self.d * t[:, None])
            self.t = torch.where(iterating, t, self.t)

            # torch: `if gtd > -tolerance_change: break` (not a descent direction)
            gtd = _dot(g, self.d)
            iterating = iterating & (gtd <= -self.tolerance_change)

            # ---- move, x += t d; evaluate again unless this was the last iteration
            self.x = torch.where(iterating[:, None], self.x + self.t[:, None] * self.d, self.x)
            if n == self.max_iter:
                break
            self.evaluating = iterating
            new_loss, new_g = self._evaluate(energy_and_forces)
            loss = torch.where(iterating, new_loss, loss)
            g = torch.where(iterating[:, None], new_g, g)
            self.n_evals += iterating
            if 1 + n >= self.max_eval:            # current_evals >= max_eval
                break
            stop = ((g.abs().amax(1) <= self.tolerance_grad)                 # optimal
                    | ((self.d * self.t[:, None]).abs().amax(1) <= self.tolerance_change)
                    | ((loss - self.prev_loss).abs() < self.tolerance_change))
            iterating = iterating & ~stop

        # official GOLF: done = last gathered gradient's max |component| <= grad_threshold
        self.converged |= running & (g.abs().amax(1) <= self.grad_threshold)


class BatchedAdam(BatchedOptimizer):
    """torch.optim.Adam (no weight decay, no amsgrad), one instance per slot, batched.
    One step = one force evaluation and one update; grad = -F."""

    def __init__(self, positions, batch, n_slots=None, *, lr=5e-3, betas=(0.9, 0.999),
                 eps=1e-8, grad_threshold=1e-5, max_step=None, model_dtype=None):
        self.lr, self.betas, self.eps = lr, betas, eps
        super().__init__(positions, batch, n_slots, grad_threshold=grad_threshold,
                         max_step=max_step, model_dtype=model_dtype)

    def _init_state(self):
        super()._init_state()
        f64 = dict(dtype=torch.float64, device=self.device)
        self.step_count = torch.zeros(self.n_slots, **f64)   # torch: state['step']
        self.exp_avg = torch.zeros(self.n_slots, 0, **f64)     # m  [S, D]
        self.exp_avg_sq = torch.zeros(self.n_slots, 0, **f64)  # v  [S, D]
        self._padded += ["exp_avg", "exp_avg_sq"]

    def _reset_state(self, k):
        self.step_count[k] = 0.0
        self.exp_avg[k] = 0.0
        self.exp_avg_sq[k] = 0.0

    @torch.no_grad()
    def step(self, energy_and_forces):
        start = self._start_first_order_step(energy_and_forces)
        if start is None:
            return
        moving, g = start
        mv = moving[:, None]
        beta1, beta2 = self.betas
        self.step_count = self.step_count + moving
        self.exp_avg = torch.where(mv, self.exp_avg.lerp(g, 1 - beta1), self.exp_avg)
        self.exp_avg_sq = torch.where(
            mv, torch.addcmul(self.exp_avg_sq * beta2, g, g, value=1 - beta2), self.exp_avg_sq)
        step = self.step_count.clamp(min=1.0)                  # avoid 0/0 for idle slots
        bias_correction1 = 1 - beta1 ** step                    # [S]
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()      # [S]
        step_size = self.lr / bias_correction1                  # [S]
        denom = self.exp_avg_sq.sqrt() / bias_correction2_sqrt[:, None] + self.eps
        self._move(moving, -step_size[:, None] * (self.exp_avg / denom))  # torch: addcdiv_


class BatchedSGD(BatchedOptimizer):
    """torch.optim.SGD with momentum (dampening 0, no Nesterov), one instance per slot,
    batched: buf = momentum * buf + g (buf = g on the first step), x -= lr * buf."""

    def __init__(self, positions, batch, n_slots=None, *, lr=5e-3, momentum=0.9,
                 grad_threshold=1e-5, max_step=None, model_dtype=None):
        self.lr, self.momentum = lr, momentum
        super().__init__(positions, batch, n_slots, grad_threshold=grad_threshold,
                         max_step=max_step, model_dtype=model_dtype)

    def _init_state(self):
        super()._init_state()
        self.momentum_buffer = torch.zeros(self.n_slots, 0, dtype=torch.float64,
                                           device=self.device)
        self._padded += ["momentum_buffer"]

    def _reset_state(self, k):
        self.momentum_buffer[k] = 0.0            # 0.9 * 0 + g == g: torch's first step

    @torch.no_grad()
    def step(self, energy_and_forces):
        start = self._start_first_order_step(energy_and_forces)
        if start is None:
            return
        moving, g = start
        buf = self.momentum_buffer
        self.momentum_buffer = torch.where(moving[:, None], buf * self.momentum + g, buf)
        self._move(moving, -self.lr * self.momentum_buffer)


# ------------------------------------------------------------------------------ helpers
DEFAULT_LR = {"lbfgs": 1.0, "adam": 5e-3, "sgd": 5e-3}   # Table 5 and Table 6


def make_optimizer(name, positions, batch, n_slots=None, lr=None, max_iter=5, history=100,
                   max_step=None, grad_threshold=1e-5, model_dtype=None):
    """The optimizer of `--conf_opt name` (lbfgs | adam | sgd); lr None = paper default."""
    if name not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {name!r}; expected lbfgs, adam or sgd")
    lr = DEFAULT_LR[name] if lr is None else lr
    common = dict(lr=lr, grad_threshold=grad_threshold, max_step=max_step,
                  model_dtype=model_dtype)
    if name == "lbfgs":
        return BatchedLBFGS(positions, batch, n_slots, max_iter=max_iter,
                            history_size=history, **common)
    if name == "adam":
        return BatchedAdam(positions, batch, n_slots, **common)
    return BatchedSGD(positions, batch, n_slots, momentum=0.9, **common)


# Appendix B, Table 6: GOLF with each optimizer. 2e5 NNP updates = K * U with U = 20, so
# K = 1e4; T_train / T_eval and the rate per optimizer; SGD's momentum 0.9 is make_optimizer's.
# A preset fills these flags; a flag given on the command line wins (parse_args_with_preset).
OPTIMIZER_PRESETS = {
    "golf-lbfgs": dict(conf_opt="lbfgs", conf_opt_lr=1.0, timelimit_train=100,
                       timelimit_eval=100, max_oracle_steps=10_000, utd_ratio=20),
    "golf-adam": dict(conf_opt="adam", conf_opt_lr=5e-3, timelimit_train=200,
                      timelimit_eval=500, max_oracle_steps=10_000, utd_ratio=20),
    "golf-sgd": dict(conf_opt="sgd", conf_opt_lr=5e-3, timelimit_train=200,
                     timelimit_eval=500, max_oracle_steps=10_000, utd_ratio=20),
}


def parse_args_with_preset(parser, argv=None):
    """parser.parse_args, with --optimizer_preset's values in place of the defaults: argparse
    sets a default only on a namespace attribute that is not there yet, so the preset's
    values stay unless the command line names the flag. Only the parser's own flags are
    filled (golf.py has no --timelimit_eval, evaluate.py no --timelimit_train)."""
    name = parser.parse_known_args(argv)[0].optimizer_preset
    if name is None:
        return parser.parse_args(argv)
    flags = {action.dest for action in parser._actions}
    preset = {k: v for k, v in OPTIMIZER_PRESETS[name].items() if k in flags}
    return parser.parse_args(argv, namespace=argparse.Namespace(**preset))


def add_optimizer_args(parser, convergence=True):
    """The shared command-line flags of the conformation optimizer. convergence=False: no
    --grad_threshold (a script with a stop rule of its own, relax.py's --fmax)."""
    parser.add_argument("--optimizer_preset", choices=sorted(OPTIMIZER_PRESETS), default=None,
                        help="Table 6 (App. B): GOLF-LBFGS / GOLF-Adam / GOLF-SGD-momentum's "
                             "optimizer, rate, T_train, T_eval, K = 1e4 and U = 20 (2e5 "
                             "updates); flags given explicitly override it")
    parser.add_argument("--conf_opt", choices=["lbfgs", "adam", "sgd"], default="lbfgs",
                        help="optimizer of the NNP-optimization (Eq. 3)")
    parser.add_argument("--conf_opt_lr", type=float, default=None,
                        help="its rate; default 1.0 for lbfgs, 5e-3 for adam and sgd")
    parser.add_argument("--max_iter", type=int, default=5,
                        help="L-BFGS iterations per trajectory step")
    parser.add_argument("--lbfgs_history", type=int, default=100, help="L-BFGS memory size")
    parser.add_argument("--max_step", type=float, default=None,
                        help="largest atom displacement per update, Angstrom (default: off)")
    if convergence:
        parser.add_argument("--grad_threshold", type=float, default=1e-5,
                            help="a molecule is converged when max |F| <= this")
    else:
        parser.set_defaults(grad_threshold=1e-5)     # the optimizer's, not a flag
    return parser


def optimizer_from_args(args, positions, batch, n_slots=None, model_dtype=None):
    """make_optimizer with the flags of add_optimizer_args."""
    return make_optimizer(args.conf_opt, positions, batch, n_slots, lr=args.conf_opt_lr,
                          max_iter=args.max_iter, history=args.lbfgs_history,
                          max_step=args.max_step, grad_threshold=args.grad_threshold,
                          model_dtype=model_dtype)


if __name__ == "__main__":
    print(add_optimizer_args(argparse.ArgumentParser()).parse_args())
