"""Stage 2: train PaiNN on labelled conformations (the paper's f_baseline, f_traj-K, f_rdkit).

    f_baseline:  python train_baseline.py --db D0.db --out_dir runs/baseline
    f_traj-K:    python train_baseline.py --db D0.db D_traj.db --load_baseline runs/baseline/checkpoint.pt ...
    f_rdkit:     python train_baseline.py --db D0.db D_rdkit.db --load_baseline ...

Every conformation of --db is trained on, as the paper trains f_baseline on all of D0.
Validation: with --val_db, the errors are measured on it (a labelled db of molecules none of
the models trains on: pass the same one to f_baseline, f_traj-K and golf.py). Without it
there is no validation, unless --val_fraction > 0 holds that share of the molecules of --db
out of training (data.split_by_molecule, seeded by --seed; the held-out molecules then
differ between --db D0 and --db D0 D_traj).

Loss (Eq. 2), per molecule with n atoms, averaged over the minibatch:
    L = rho * (E - f(z, X))^2 + c_F * (1/n) sum_i |F_i + d f / d X_i|^2
with rho = --energy_loss_coef and c_F = --force_loss_coef, in Hartree and Hartree/A.
Adam with cosine annealing from --lr to --lr_final over --total_steps, gradient-norm clipping
at --clip_value (Table 5). golf.py trains with the same `Trainer`.

Outputs in --out_dir: checkpoint.pt (every --checkpoint_every steps, at a stop signal and at
the end: weights, Adam, the schedule, the minibatch order and the RNGs) and metrics.jsonl
(the validation errors every --eval_every steps). --resume continues from checkpoint.pt
exactly as an uninterrupted run would go on (the log records after its step are dropped).
SIGTERM (a scheduler's) or Ctrl-C during training stops it at the end of the step it
interrupts and saves the checkpoint (before training: at once, nothing to save); one line
names what is saved and the command to continue (the same command with --resume); exit
status 143 (SIGTERM) or 130 (Ctrl-C). Bad input: one `error:` line, exit status 2.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import oracle_pool
import painn
import safe_io


def add_model_args(parser):
    """PaiNN sizes, Table 5."""
    g = parser.add_argument_group("model (Table 5)")
    g.add_argument("--n_interactions", type=int, default=3)
    g.add_argument("--cutoff", type=float, default=5.0, help="Angstrom")
    g.add_argument("--n_rbf", type=int, default=50)
    g.add_argument("--n_atom_basis", type=int, default=128)
    add_compile_arg(g)


def add_compile_arg(parser):
    """--compile, shared by train_baseline.py, golf.py and evaluate.py."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile PaiNN's network for energy + forces without a "
                             "graph (NNP-optimization, validation; training steps stay eager)")


def add_training_args(parser, total_steps=500_000, fine_tune=False):
    """Optimization of the NNP, Table 5 (and the official code's flag names). fine_tune
    (golf.py): no --total_steps (GOLF's schedule spans K * U updates) and --load_baseline,
    the NNP to fine-tune, is required."""
    g = parser.add_argument_group("training (Table 5)")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    g.add_argument("--lr_final", type=float, default=1e-7, help="end of the cosine annealing")
    if not fine_tune:
        g.add_argument("--total_steps", type=int, default=total_steps,
                       help="training updates (paper: 5e5; 1e6 for traj-500k)")
    g.add_argument("--clip_value", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--energy_loss_coef", type=float, default=0.01, help="rho of Eq. 2")
    g.add_argument("--force_loss_coef", type=float, default=0.99)
    g.add_argument("--energy_kind", choices=data.ENERGY_KINDS, default="auto",
                   help="how the db stores energies (nablaDFT: formation; GOLF: total)")
    g.add_argument("--checkpoint_every", type=int, default=1000)
    if fine_tune:
        g.add_argument("--load_baseline", required=True,
                       help="f_baseline's checkpoint (train_baseline.py), the NNP to fine-tune")
    else:
        g.add_argument("--load_baseline", default=None, help="start from this checkpoint")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------
# Loss (Eq. 2) and one training update
# ---------------------------------------------------------------------------------------

def energy_force_loss(model, b, energy_loss_coef, force_loss_coef):
    """Eq. 2 on a collated minibatch `b` (data.Batch). Returns the scalar loss."""
    energy, forces = model(b.z, b.positions, b.batch, b.n_molecules, create_graph=True)
    energy_err = (energy - b.energy).to(forces.dtype)                        # [n_molecules]
    force_err = ((forces - b.forces) ** 2).sum(-1)                           # [n_atoms]
    n_atoms = force_err.new_zeros(b.n_molecules).index_add(0, b.batch, torch.ones_like(force_err))
    force_err = force_err.new_zeros(b.n_molecules).index_add(0, b.batch, force_err) / n_atoms
    return (energy_loss_coef * energy_err ** 2 + force_loss_coef * force_err).mean()


class Trainer:
    """Adam + cosine annealing + clipping around a model; `update(minibatch)` is one step of
    Eq. 2 on a data.Batch (e.g. data.ConformationTensors.gather) or a list of
    data.Conformations. A non-finite loss or gradient skips the update (counted in
    n_skipped). No host-device sync in a step: the skip is a flag tensor that fused Adam
    reads on the device, and the loss comes back as a tensor."""

    def __init__(self, model, args, total_steps):
        self.model, self.args = model, args
        self.dtype = getattr(torch, args.dtype)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(total_steps, 1), eta_min=args.lr_final)
        self.step = 0
        self._n_skipped = torch.zeros((), dtype=torch.long, device=args.device)

    def update(self, minibatch):
        """One update; returns the loss, a 0-d tensor on the device (float() waits for it)."""
        self.model.train()
        b = minibatch if isinstance(minibatch, data.Batch) else \
            data.collate(minibatch, self.args.device, self.dtype)
        loss = energy_force_loss(self.model, b, self.args.energy_loss_coef,
                                 self.args.force_loss_coef)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_value)
        skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = skip.float()       # fused Adam: no update where set
        self.optimizer.step()
        self._n_skipped += skip
        self.scheduler.step()
        self.step += 1
        return loss.detach()

    @property
    def n_skipped(self):
        return int(self._n_skipped)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "n_skipped": self.n_skipped}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:     # checkpoints of the unfused Adam
            group["fused"] = True
            for p in group["params"]:
                if "step" in self.optimizer.state.get(p, {}):
                    step = self.optimizer.state[p]["step"]
                    self.optimizer.state[p]["step"] = step.to(p.device, torch.float32)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self._n_skipped.fill_(state["n_skipped"])


def prediction_errors(model, confs, batch_size=64, device="cpu", dtype=torch.float32):
    """Energy and force errors of the NNP on labelled conformations (a list, or
    data.ConformationTensors already on the device), kcal/mol(/A)."""
    model.eval()
    if not isinstance(confs, data.ConformationTensors):
        confs = data.ConformationTensors(confs, device, dtype)
    energy_err, force_err = [], []
    for start in range(0, len(confs), batch_size):
        b = confs.gather(np.arange(start, min(start + batch_size, len(confs))))
        energy, forces = model(b.z, b.positions, b.batch, b.n_molecules)
        energy_err.append((energy - b.energy).detach())
        force_err.append((forces.double() - b.forces.double()).detach().flatten())
    e = torch.cat(energy_err).cpu().numpy() * data.HARTREE_TO_KCAL   # one copy to the host
    f = torch.cat(force_err).cpu().numpy() * data.HARTREE_TO_KCAL
    return {"n_conformations": len(confs),
            "energy_mae_kcal_mol": float(np.abs(e).mean()),
            "energy_rmse_kcal_mol": float(np.sqrt((e ** 2).mean())),
            "forces_mae_kcal_mol_A": float(np.abs(f).mean()),
            "forces_rmse_kcal_mol_A": float(np.sqrt((f ** 2).mean()))}


# ---------------------------------------------------------------------------------------
# Model construction, RNG state, checkpoints
# ---------------------------------------------------------------------------------------

def build_model(args, train_confs, atomrefs):
    """A fresh PaiNN of the flags' sizes, or the --load_baseline checkpoint. Reference
    energies: the checkpoint's, else the db's atomrefs, else a least-squares fit."""
    if args.load_baseline:
        model = painn.load_checkpoint(args.load_baseline)
        print(f"starting from {args.load_baseline} ({model.hparams})")
    else:
        if atomrefs is None:
            atomrefs = data.fit_atomrefs(train_confs)
            print("no atomrefs in the db: per-element references fitted by least squares")
        model = painn.PaiNN(n_atom_basis=args.n_atom_basis, n_interactions=args.n_interactions,
                            n_rbf=args.n_rbf, cutoff=args.cutoff, atomrefs=atomrefs)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype))


def rng_state(rng):
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(rng, state):
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


def read_training_dbs(paths, energy_kind):
    """All labelled conformations of the dbs, and the first atomrefs any of them carries."""
    confs, atomrefs = [], None
    for path in paths:
        c, refs = data.read_db(path, energy_kind, require_energy=True, require_forces=True)
        confs += c
        atomrefs = atomrefs or refs
    return confs, atomrefs


def log_metrics(path, record):
    safe_io.append_jsonl(path, record)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", nargs="+", required=True, help="labelled ASE dbs (D0 [+ D_traj])")
    p.add_argument("--out_dir", required=True, help="checkpoint.pt and metrics.jsonl go here")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="share of the molecules of --db held out of training to validate on "
                        "(default: %(default)s, every conformation trained on, as the paper "
                        "trains on all of D0; e.g. 0.05); not with --val_db")
    p.add_argument("--val_db", default=None,
                   help="labelled db to validate on; then all of --db is trained on")
    p.add_argument("--eval_every", type=int, default=1000)
    add_model_args(p)
    add_training_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = safe_io.continue_command(      # this command line (main(argv): this file + argv)
        "--resume", None if argv is None else [__file__, *map(str, argv)])
    try:
        with safe_io.StopSignals():    # until training starts: Interrupted at once
            return read_and_fit(args, command)
    except (data.DataError, painn.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except safe_io.Interrupted as stop:  # before training (fit saves at a stop in training)
        ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
        saved = f"the last checkpoint saved, {ckpt_path}" if os.path.exists(ckpt_path) else \
            "nothing written yet"
        print(safe_io.stopped_line(stop, saved, command), file=sys.stderr)
        return stop.exit_code


def read_and_fit(args, command):
    if not 0.0 <= args.val_fraction < 1.0:
        raise data.DataError(f"--val_fraction must be in [0, 1), not {args.val_fraction}")
    if args.val_db and args.val_fraction:
        raise data.DataError("--val_db and --val_fraction both validate; pass one of them")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(oracle_pool.usable_cores()[1])   # the cores other jobs leave idle
    confs, atomrefs = read_training_dbs(args.db, args.energy_kind)
    if args.val_db:
        train, val = confs, read_training_dbs([args.val_db], args.energy_kind)[0]
    else:
        train, val = data.split_by_molecule(confs, args.val_fraction, seed=args.seed)
    print(f"{len(train)} training and {len(val)} validation conformations")
    os.makedirs(args.out_dir, exist_ok=True)
    with safe_io.output_lock(args.out_dir):         # one writer per out_dir
        return fit(args, rng, train, val, atomrefs, command)


def fit(args, rng, train, val, atomrefs, command):
    """Train to --total_steps; the exit status (0, or 143 / 130 after a stop signal)."""
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")

    model = build_model(args, train, atomrefs)
    if args.compile:
        model.compile_network()
    trainer = Trainer(model, args, args.total_steps)
    sampler = data.Minibatches(len(train), args.batch_size, rng)
    train_tensors = data.ConformationTensors(train, args.device, trainer.dtype)   # on the device
    val_tensors = data.ConformationTensors(val, args.device, trainer.dtype)
    if args.resume and os.path.exists(ckpt_path):
        ckpt = painn.read_checkpoint(ckpt_path, args.device)
        model.load_state_dict(ckpt["model"]["state_dict"])
        trainer.load_state_dict(ckpt["trainer"])
        sampler.order, sampler.pos = np.asarray(ckpt["sampler"]["order"]), ckpt["sampler"]["pos"]
        set_rng_state(rng, ckpt["rng"])
        print(f"resumed from {ckpt_path} at step {trainer.step}")
    elif os.path.exists(ckpt_path):
        raise data.DataError(f"{ckpt_path} exists; pass --resume to continue it or choose "
                             "another --out_dir")
    if os.path.exists(metrics_path):
        # records a killed run logged after its checkpoint will be logged again from it: drop
        # them (and a torn last line), so that a killed and resumed run logs what an
        # uninterrupted one does
        kept = [r for r in safe_io.read_jsonl(metrics_path) if r["step"] <= trainer.step]
        with safe_io.atomic_write(metrics_path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    if trainer.step >= args.total_steps:
        print(f"already trained for --total_steps {args.total_steps}: nothing to do")
        return 0

    def save():
        painn.save_checkpoint(model, ckpt_path, trainer=trainer.state_dict(),
                              sampler={"order": sampler.order.tolist(), "pos": sampler.pos},
                              rng=rng_state(rng), args=vars(args))

    def validate():
        if not val:
            return
        errors = prediction_errors(model, val_tensors, args.batch_size)
        record = {"step": trainer.step, "lr": trainer.lr, "n_skipped": trainer.n_skipped, **errors}
        log_metrics(metrics_path, record)
        tqdm.write(f"step {trainer.step}: val energy MAE {errors['energy_mae_kcal_mol']:.3f} "
                   f"kcal/mol, forces MAE {errors['forces_mae_kcal_mol_A']:.3f} kcal/mol/A")

    bar = safe_io.progress(total=args.total_steps, initial=trainer.step, desc="train",
                           dynamic_ncols=True)
    # a stop signal waits for the end of the step, its validation and checkpoint; then the
    # state is saved as a checkpoint_every checkpoint would save it
    with safe_io.StopSignals(deferred=True) as stop:
        try:
            while trainer.step < args.total_steps:
                stop.check()
                loss = trainer.update(train_tensors.gather(sampler.next_indices()))
                bar.update(1)
                if trainer.step % 50 == 1:   # reading the loss waits for the device
                    bar.set_postfix(loss=f"{float(loss):.3e}", lr=f"{trainer.lr:.1e}")
                if trainer.step % args.eval_every == 0:
                    validate()
                if trainer.step % args.checkpoint_every == 0:
                    save()
        except safe_io.Interrupted as stopped:
            bar.close()
            save()
            print(safe_io.stopped_line(stopped, f"checkpoint at step {trainer.step} of "
                                                f"{args.total_steps} in {ckpt_path}", command),
                  file=sys.stderr)
            return stopped.exit_code
        bar.close()
        if trainer.step % args.eval_every:
            validate()
        save()
    print(f"done: {trainer.step} steps ({trainer.n_skipped} skipped, non-finite); "
          f"checkpoint {ckpt_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
