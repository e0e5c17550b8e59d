"""The GPU measurements of docs/gpu.md in one call, printed as one markdown table.

    .venv/bin/python benchmarks/gpu.py                        # on the GPU (--device cuda)
    .venv/bin/python benchmarks/gpu.py --device cpu --small   # a quick run of every branch

Rows (ours vs the reference, ratio = reference time / ours, and the goal on an H100):
  * PaiNN energy + forces, 64 and 1024 molecules of 30-40 atoms: ours (evaluation "auto":
    one pass on a GPU) vs schnetpack 2.1.1 with the same weights; also ours in molecule
    groups (the CPU mode) and ours with --compile (compile_network);
  * PaiNN training step (forces in the loss, backward through them), 64 and 256 molecules;
  * the training loop of train_baseline.py, batch 64: steps/s with minibatches gathered from
    data.ConformationTensors on the device vs collated from Conformations every step;
  * batched L-BFGS (optimizers.BatchedLBFGS, one NNP call per inner evaluation) vs one
    torch.optim.LBFGS per molecule (the official code), 64 molecules x 100 steps and 512
    molecules; the share of the batched run outside the NNP calls (the optimizer's own);
  * equality: our model on --device vs on CPU (float64 and float32), and 10 L-BFGS steps in
    float64 on --device vs on CPU.
Models: PaiNN of Table 5 (128 features, 3 blocks, 50 RBF, 5 A), float32 unless said.
The per-molecule L-BFGS reference runs --reference_steps steps and is scaled to the batched
run's steps (its cost per step is flat: one molecule at a time).
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import optimizers  # noqa: E402
import painn  # noqa: E402
import train_baseline  # noqa: E402
from molecules import load_molecules  # noqa: E402


def load_script(name):
    """benchmarks/NAME.py as a module (benchmarks/painn.py shares its name with painn.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_painn = load_script("painn")
bench_opt = load_script("optimizers")


MOLECULES = {}      # --molecules file: {"z": [...], "pos": [...]}, for a machine without RDKit


def molecules(n, seed=0):
    """n molecules of 30-40 atoms (ETKDG, benchmarks/molecules.py, or the --molecules file);
    the distinct ones repeated if the file has fewer."""
    if MOLECULES:
        distinct = list(zip(MOLECULES["z"], MOLECULES["pos"]))
    else:
        try:
            return load_molecules(n, 30, 40, seed=seed)
        except SystemExit:
            distinct = load_molecules(512, 30, 40, seed=seed)
    return [distinct[i % len(distinct)] for i in range(n)]


def save_molecules(path, n, seed):
    mols = molecules(n, seed)
    np.savez_compressed(path, n_atoms=[len(z) for z, _ in mols], z=np.concatenate([z for z, _ in mols]),
                        pos=np.concatenate([p for _, p in mols]))
    print(f"wrote {n} molecules to {path}")


def read_molecules(path):
    f = np.load(path)
    split = np.cumsum(f["n_atoms"])[:-1]
    MOLECULES.update(z=np.split(f["z"], split), pos=np.split(f["pos"], split))


class Table:
    def __init__(self):
        self.rows = []

    def add(self, what, ours, reference, goal="", unit="ms", higher_is_better=False):
        """ours / reference in seconds (unit ms) or any number (e.g. steps/s)."""
        scale = 1e3 if unit == "ms" else 1.0
        fmt = lambda v: "" if v is None else (f"{v * scale:.2f} {unit}" if isinstance(v, float) else str(v))
        ratio = ""
        if isinstance(ours, float) and isinstance(reference, float) and ours and reference:
            ratio = f"{(ours / reference if higher_is_better else reference / ours):.1f}x"
        self.rows.append((what, fmt(ours), fmt(reference), ratio, goal))
        print(f"  {what}: ours {fmt(ours)}, reference {fmt(reference)} {ratio}", flush=True)

    def print(self, title):
        print(f"\n{title}\n")
        print("| measurement | ours | reference | ratio | goal (H100) |")
        print("|---|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


# ------------------------------------------------------------------------- PaiNN
def painn_rows(table, args, device, spk):
    """Our PaiNN vs schnetpack's with the same weights (spk None, where schnetpack is not
    installed: ours only, random weights, the reference columns left empty)."""
    if spk is not None:
        nnp, ours, hparams, state_dict = bench_painn.same_weights(spk, args.seed, device)
    else:
        torch.manual_seed(args.seed)
        ours = painn.PaiNN(**bench_painn.SIZES).float().to(device)
        nnp, hparams, state_dict = None, dict(ours.hparams), ours.state_dict()

    def our_model(evaluation="auto"):
        model = painn.PaiNN(**hparams)
        model.load_state_dict(state_dict)
        model = model.float().to(device)
        model.evaluation = evaluation
        return model

    groups = our_model("groups")
    timed = lambda fns: bench_painn.compare([f for f in fns if f], args.repeats) + [None]
    for n, goal_ef, goal_train in [(args.n_small, ">= 2x", ">= 2x"),
                                   (args.n_large, ">= 3x", None),
                                   (args.n_train_large, None, ">= 2x")]:
        mols = molecules(n, args.seed)
        z, pos, batch = bench_painn.flat(mols, torch.float32, device)
        inputs = bench_painn.schnetpack_inputs(spk, mols, device) if nnp else None
        target_e = torch.randn(n, device=device)
        target_f = torch.randn(len(z), 3, device=device)
        mse = torch.nn.functional.mse_loss

        def ef(model):
            model.eval()
            return lambda: model(z, pos, batch, n)

        def spk_ef():
            nnp.eval()
            nnp(dict(inputs))

        def train(model):
            def step():
                model.train()
                model.zero_grad(set_to_none=True)
                e, f = model(z, pos, batch, n, create_graph=True)
                (mse(e.float(), target_e) + mse(f, target_f)).backward()
            return step

        def spk_train():
            nnp.train()
            nnp.zero_grad(set_to_none=True)
            o = nnp(dict(inputs))
            (mse(o["energy"], target_e) + mse(o["forces"], target_f)).backward()

        if goal_ef:
            t_ours, t_groups, t_spk = timed([ef(ours), ef(groups), spk_ef if nnp else None])[:3]
            table.add(f"PaiNN energy+forces, {n} molecules", t_ours, t_spk, goal_ef)
            table.add(f"  the same, ours in molecule groups (the CPU mode, as shipped)",
                      t_groups, t_spk)
        if goal_train:
            t_ours, t_spk = timed([train(ours), spk_train if nnp else None])[:2]
            table.add(f"PaiNN training step, {n} molecules", t_ours, t_spk, goal_train)
    if args.compile:
        mols = molecules(args.n_small, args.seed)
        z, pos, batch = bench_painn.flat(mols, torch.float32, device)
        compiled = our_model().eval().compile_network()
        t0 = time.perf_counter()
        compiled(z, pos, batch)
        bench_painn.synchronize()
        print(f"  torch.compile of the network: {time.perf_counter() - t0:.1f} s", flush=True)
        e0, f0 = ours.eval()(z, pos, batch)
        e1, f1 = compiled(z, pos, batch)
        diff = max(float((e1 - e0).abs().max()), float((f1 - f0).abs().max()))
        t_comp, t_ours = bench_painn.compare([lambda: compiled(z, pos, batch),
                                              lambda: ours(z, pos, batch)], args.repeats)
        table.add(f"PaiNN energy+forces, {args.n_small} molecules, --compile vs eager "
                  f"(max diff {diff:.1e})", t_comp, t_ours, "pays if > 1x")


# ------------------------------------------------------------------------- training loop
def training_rows(table, args, device):
    mols = molecules(args.n_train_confs, args.seed + 1)
    rng = np.random.default_rng(0)
    confs = [data.Conformation(numbers=z, positions=p, energy=float(rng.normal()),
                               forces=rng.normal(size=p.shape)) for z, p in mols]
    targs = argparse.Namespace(lr=1e-4, lr_final=1e-7, dtype="float32", device=str(device),
                               energy_loss_coef=0.01, force_loss_coef=0.99, clip_value=1.0)
    results = []
    for on_device in (True, False):
        torch.manual_seed(0)
        model = painn.PaiNN(**bench_painn.SIZES, atomrefs=data.fit_atomrefs(confs)).to(device)
        trainer = train_baseline.Trainer(model, targs, args.train_steps)
        sampler = data.Minibatches(len(confs), args.batch_size, np.random.default_rng(0))
        tensors = data.ConformationTensors(confs, device, torch.float32)

        def step():
            idx = sampler.next_indices()
            return trainer.update(tensors.gather(idx) if on_device else [confs[i] for i in idx])
        for _ in range(5):
            step()
        bench_painn.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            loss = step()
        float(loss)
        results.append(args.train_steps / (time.perf_counter() - t0))
    table.add(f"train_baseline loop, batch {args.batch_size} (30-40 atoms): device tensors "
              "vs collate per step", results[0], results[1], ">= 60 steps/s", unit="steps/s",
              higher_is_better=True)


# ------------------------------------------------------------------------- L-BFGS
def lbfgs_rows(table, args, device):
    torch.manual_seed(args.seed)
    model = painn.PaiNN(**bench_painn.SIZES).float().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for n, goal, share_goal, ref_steps in [
            (args.n_small, ">= 50x", "<= 10 %", args.reference_steps),
            (args.n_lbfgs_large, ">= 300x", None, max(1, args.reference_steps // 5))]:
        mols = [(torch.as_tensor(z, device=device), torch.as_tensor(p, device=device))
                for z, p in molecules(n, args.seed)]
        wall_b, model_b, _, _ = bench_opt.run_batched(model, mols, args.lbfgs_steps, 100, 1.0, False)
        wall_r, _, _, _ = bench_opt.run_per_molecule(model, mols, ref_steps, 100, 1.0)
        scaled = wall_r * args.lbfgs_steps / ref_steps
        table.add(f"batched L-BFGS vs torch.optim.LBFGS per molecule, {n} molecules x "
                  f"{args.lbfgs_steps} steps", wall_b, scaled, goal, unit="s")
        if share_goal:
            table.rows.append((f"  optimizer share of that batched run (outside the NNP calls)",
                               f"{100 * (wall_b - model_b) / wall_b:.1f} %",
                               f"{1e3 * (wall_b - model_b) / args.lbfgs_steps:.1f} ms a step", "",
                               share_goal))
            print(f"  optimizer share {table.rows[-1][1]}", flush=True)


# ------------------------------------------------------------------------- equality
def equality_rows(table, args, device):
    mols = molecules(args.n_small, args.seed)
    torch.manual_seed(args.seed)
    base = painn.PaiNN(**bench_painn.SIZES).eval()
    other = "cpu" if device.type != "cpu" else "cpu, one pass vs groups"
    for dtype in (torch.float64, torch.float32):
        ref = base.to(dtype)
        ref.evaluation = "groups"
        e0, f0 = ref(*bench_painn.flat(mols, dtype, "cpu"))
        dev = painn.PaiNN(**bench_painn.SIZES)
        dev.load_state_dict(ref.state_dict())
        dev = dev.to(device=device, dtype=dtype).eval()
        dev.evaluation = "one_pass" if device.type == "cpu" else "auto"
        e1, f1 = dev(*bench_painn.flat(mols, dtype, device))
        de, df = float((e1.cpu() - e0).abs().max()), float((f1.cpu() - f0).abs().max())
        table.rows.append((f"max abs difference {device} vs {other}, {str(dtype)[6:]}, "
                           f"{len(mols)} molecules", f"dE {de:.1e} Ha", f"dF {df:.1e} Ha/A", "",
                           "<= 1e-5"))
        print(f"  {table.rows[-1]}", flush=True)
    # L-BFGS in float64, 10 steps, 8 molecules: device vs CPU
    model64 = base.double()
    finals = []
    for where in ("cpu", device):
        m = painn.PaiNN(**bench_painn.SIZES)
        m.load_state_dict(model64.state_dict())
        m = m.double().to(where).eval()
        ms = [(torch.as_tensor(z, device=where), torch.as_tensor(p, device=where)) for z, p in mols[:8]]
        *_, opt = bench_opt.run_batched(m, ms, 10, 100, 1.0, False)
        finals.append(opt.positions.cpu())
    table.rows.append((f"L-BFGS, float64, {len(ms)} molecules x 10 steps: final positions {device} vs cpu",
                       f"{float((finals[0] - finals[1]).abs().max()):.1e} A", "", "", "<= 1e-5"))
    print(f"  {table.rows[-1]}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true",
                   help="tiny sizes: a check that every branch runs (e.g. on CPU), not a measurement")
    p.add_argument("--sections", default="painn,training,lbfgs,equality")
    p.add_argument("--no_compile", dest="compile", action="store_false",
                   help="skip the --compile row (its compilation takes a minute or more)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--molecules", help="read the molecules from this .npz (made with "
                   "--save_molecules where RDKit is installed) instead of embedding them")
    p.add_argument("--save_molecules", help="write the 1024 molecules to this .npz and stop")
    args = p.parse_args()
    if args.save_molecules:
        return save_molecules(args.save_molecules, 1024, args.seed)
    if args.molecules:
        read_molecules(args.molecules)
    sizes = dict(n_small=64, n_large=1024, n_train_large=256, n_lbfgs_large=512,
                 lbfgs_steps=100, reference_steps=5, n_train_confs=512, batch_size=64,
                 train_steps=200)
    if args.small:
        sizes = dict(n_small=4, n_large=8, n_train_large=6, n_lbfgs_large=6, lbfgs_steps=3,
                     reference_steps=1, n_train_confs=12, batch_size=4, train_steps=3)
        args.repeats = 1
    vars(args).update(sizes)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {device} ({name}), {torch.get_num_threads()} CPU threads; "
          f"sizes {sizes}", flush=True)
    table = Table()
    t0 = time.perf_counter()
    sections = args.sections.split(",")
    if "painn" in sections:
        painn_rows(table, args, device, bench_painn.import_schnetpack())
    elif "ours" in sections:          # no schnetpack on the machine: our rows only
        painn_rows(table, args, device, None)
    if "training" in sections:
        training_rows(table, args, device)
    if "lbfgs" in sections:
        lbfgs_rows(table, args, device)
    if "equality" in sections:
        equality_rows(table, args, device)
    table.print(f"benchmarks/gpu.py on {name}, torch {torch.__version__} "
                f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
