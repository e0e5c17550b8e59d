"""What evaluate.py measured, as the paper shows it: Table 2, the claims, Figures 1-3, and
the 3D page of Appendix H. Every number comes from summary.json and per_conformation.jsonl,
scored by metrics.py (Eq. 4-8, its bootstrap): the claims and the page's pct_T call it,
nothing here defines a metric.

    format_table([(name, summary), ...])          Table 2 as text: a row per model, cells
                                                  `value [lo, hi]` with 95 % intervals
    check_claims([(name, energies), ...], claims) the paper's claims, each metric's verdict
                                                  from a paired bootstrap over test
                                                  conformations, pooled over seeds
    draw_figures([(name, summary), ...])          Figures 1-3 with every model; save_figures
    plot(summary, out_dir)                        one run's Figures 1-3
    write_conformations_page(path, rows, title)   conformations.html, rows of conformation_row
                                                  (one method, or several side by side)

`evaluate.py --task table --summaries ... [--claims ...] [--figures DIR]` prints the table
and the claims and saves the figures of many runs; `evaluate.py --task optimization` writes
one run's figures and page.

conformations.html (Appendix H, Fig. 5): one row per test conformation: the molecule in 2D
(RDKit's SVG), then in 3D the initial conformation s_0, each method's s_T (one method, or
several evaluations of one test set side by side: evaluate.py --task page) and the DFT
optimum s_opt, each with its DFT energy relative to the optimum (kcal/mol), its RMSD to the
optimum and, for a method, its pct_T (Eq. 4). The conformations are rotated onto s_opt
(Kabsch, all atoms), and the panels of a row turn together. The page is one
self-contained file: 3Dmol.js 2.5.5 (BSD-3-Clause, third_party/3dmol/) is inlined, the
molecules are embedded as SDF text (bonds and bond orders from the SMILES), so it opens
offline from disk, with no server.
"""
import collections
import dataclasses
import html
import json
import os

import numpy as np
from rdkit import Chem

import data
import metrics
import oracles
import safe_io


# ---------------------------------------------------------------------------------------
# Table 2: one row per model
# ---------------------------------------------------------------------------------------

TABLE_COLUMNS = [("pct_mean", "pct_T (%)"), ("pct_std", "std"), ("pct_div", "pct_div (%)"),
                 ("n_failed_oracle_T", "no SCF (n)"), ("e_res_mean_kcal_mol", "E_res (kcal/mol)"),
                 ("pct_success", "pct_success (%)"), ("pct_success_all", "of all (%)"),
                 ("cov", "COV (%)"), ("mat", "MAT (A)"), ("n_conformations", "n"),
                 ("n_unconverged_reference", "unconv. ref (n)")]


def format_table(rows):
    """rows: (name, summary) -> a text table like the paper's Table 2; a cell with a 95 %
    bootstrap interval reads `value [lo, hi]`. Counts that are not columns follow as notes."""
    def number(key, v):
        return ("-" if v is None or (isinstance(v, float) and np.isnan(v))
                else f"{v:.0f}" if key.startswith("n_") else f"{v:.2f}")
    header = ["model"] + [title for _, title in TABLE_COLUMNS]
    lines = [header]
    notes = []
    for name, s in rows:
        cells = [name]
        for key, _ in TABLE_COLUMNS:
            cell = number(key, s.get(key))
            if s.get(f"{key}_ci95") and cell != "-":
                lo, hi = s[f"{key}_ci95"]
                cell += f" [{number(key, lo)}, {number(key, hi)}]"
            cells.append(cell)
        lines.append(cells)
        if s.get("n_no_e0"):
            notes.append(f"{name}: {s['n_no_e0']} conformations without E_0 (oracle failed at "
                         "s_0) count as diverged")
        if s.get("n_mmff_unconverged"):
            notes.append(f"{name}: {s['n_mmff_unconverged']} of {s['n_conformations']} MMFF "
                         f"minimizations did not converge in {s.get('mmff_max_iters')} iterations")
    boot = next((s["bootstrap"] for _, s in rows if s.get("bootstrap")), None)
    if boot:
        notes.append(f"[lo, hi]: 95 % {boot['method']}, {boot['n_resamples']} resamples, "
                     f"seed {boot['seed']}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
                     + notes)


# ---------------------------------------------------------------------------------------
# The paper's claims (--task table --claims / --claim), pooled over seeds
# ---------------------------------------------------------------------------------------

# The paper's metrics of a claim (Eq. 4-8, Sec. 6): (name, +1 if higher is better, unit).
# pct_T, E_res and pct_success are over the conformations that did not diverge, pct_div over
# all; "of all" (successes over all conformations) is printed beside, never decided on.
CLAIM_METRICS = (("pct_T", +1, "points"), ("pct_div", -1, "points"),
                 ("E_res", -1, "kcal/mol"), ("pct_success", +1, "points"))
BESIDE_METRIC = ("of all", +1, "points")
# "A matches or beats B" on a metric: the 95 % interval of the difference in A's favour
# lies above -margin (non-inferiority). Our margins: 5 points of a percentage, and 1 kcal/mol
# of E_res (Eq. 8's chemical accuracy).
MATCH_MARGINS = {"pct_T": 5.0, "pct_div": 5.0, "E_res": metrics.CHEMICAL_ACCURACY,
                 "pct_success": 5.0}
CLAIM_RULES = ("A beats B on a metric when the 95 % paired bootstrap interval of the "
               "difference, taken so that positive favours A, lies above 0; it fails when the "
               "interval lies below 0; not shown otherwise. A matches or beats B when the "
               "interval lies above -margin (" + ", ".join(
                   f"{m} {v:g} {'kcal/mol' if m == 'E_res' else 'points'}"
                   for m, v in MATCH_MARGINS.items()) + "), fails when it lies below "
               "-margin. Each metric has its own verdict; a claim made in one metric is "
               "decided on that one.")


@dataclasses.dataclass
class Claim:
    """A claim of the paper: comparisons (A, relation, B), relation '>' (beats) or '>='
    (matches or beats); decided_on: the metrics it is made in (None: each metric)."""
    title: str
    comparisons: list
    decided_on: tuple = None


def parse_claim(spec):
    """'TITLE: A > B; C >= D [@ metric, ...]' -> Claim. A > B: A beats B; A >= B: A
    matches or beats B; after @, the metrics the claim is made in."""
    title, sep, body = spec.partition(": ")
    body, _, after = body.partition("@")
    comparisons = []
    for part in filter(None, (p.strip() for p in body.split(";"))):
        for relation in (" >= ", " > "):
            if relation in part:
                a, b = (x.strip() for x in part.split(relation, 1))
                comparisons.append((a, relation.strip(), b))
                break
        else:
            comparisons = []
            break
    names = {m for m, _, _ in CLAIM_METRICS}
    decided_on = tuple(m.strip() for m in after.split(",") if m.strip()) or None
    if not sep or not comparisons or (decided_on and not set(decided_on) <= names):
        raise data.DataError(f"--claim {spec!r}: write 'TITLE: A > B; C >= D [@ metric]' "
                             f"(> beats, >= matches or beats; metrics: {', '.join(sorted(names))})")
    return Claim(title.strip(), comparisons, decided_on)


def role_claims(roles):
    """The five claims of a run of ours (--claims BASELINE TRAJ_K TRAJ_20K GOLF_K F_RDKIT,
    '-' for a row the run has not): [(Claim, None) or (title, missing roles)]."""
    base, traj, traj_big, golf, rdkit = roles
    named = dict(zip(("f_baseline", "traj-K", "traj-20K", "GOLF-K", "f_rdkit"), roles))
    specs = [("1. GOLF-K beats f_baseline (f_baseline diverges, rarely succeeds)",
              [(golf, ">", base)], None),
             ("2. traj-K improves with K (traj-20K beats traj-K)", [(traj_big, ">", traj)], None),
             ("3. GOLF-K beats traj-K at equal K", [(golf, ">", traj)], None),
             ("4. GOLF-K matches or beats traj-20K in pct_success", [(golf, ">=", traj_big)],
              ("pct_success",)),
             ("5. GOLF-K beats f_rdkit", [(golf, ">", rdkit)], None)]
    out = []
    for title, comparisons, decided_on in specs:
        missing = [role for role, name in named.items()
                   if name == "-" and any(name in (a, b) for a, _, b in comparisons)]
        out.append((title, missing) if missing else (Claim(title, comparisons, decided_on), None))
    return out


def interval(values):
    """(point, lo, hi): values[0] is the point estimate, values[1:] the bootstrap's 95 %
    percentile interval (metrics.percentile_interval)."""
    return (float(values[0]), *metrics.percentile_interval(values[1:]))


def comparison_verdict(relation, metric, lo, hi, rates_a, rates_b, success_floor):
    """'holds', 'fails', 'not shown', or the scorer-floor note, of one comparison on one
    metric; lo, hi: the interval of the difference in A's favour."""
    bound = 0.0 if relation == ">" else -MATCH_MARGINS[metric]
    verdict = "holds" if lo > bound else "fails" if hi < bound else "not shown"
    if (verdict != "holds" and metric == "pct_success" and success_floor is not None
            and max(rates_a, rates_b) <= success_floor):
        verdict = (f"not decided: both at or below {success_floor:g} %, the success rate "
                   "the scorer leaves reachable (--success_floor, benchmarks/nnp_floor.py)")
    return verdict


def check_claims(named_energies, claims, n_resamples=2000, seed=0, success_floor=None):
    """The paper's claims as lines of text. named_energies: (name, {conf_id: (e0, e_T,
    e_opt)}) of every evaluation (evaluate.scored_energies); rows of one name are seeds of
    one model. claims: [(Claim, None) or (title, missing roles)]. A 95 % percentile
    bootstrap resamples the conformations every run scored, the same draw for every model
    and seed, so differences are paired; each metric of each comparison gets its verdict
    (CLAIM_RULES), "of all" is printed beside. success_floor (%): a pct_success comparison
    that does not hold while both rates are at or below it is not decided (the scorer's
    limit, not the models')."""
    runs = collections.defaultdict(list)                    # name -> [{conf_id: energies}]
    for name, energies in named_energies:
        runs[name].append(energies)
    needed = sorted({n for c, _ in claims if isinstance(c, Claim)
                     for a, _, b in c.comparisons for n in (a, b)})
    missing = [n for n in needed if n not in runs]
    if missing:
        raise data.DataError(f"--claims: no summary named {missing[0]} among --names")
    if not needed:
        return "no claim to check"
    common = sorted(set.intersection(*(set(o) for n in needed for o in runs[n])))
    if not common:
        raise data.DataError("--claims: the runs scored no conformation in common")
    draws = metrics.resamples(len(common), n_resamples, seed)               # [R, n]
    weights = np.vstack([np.ones(len(common))] +                            # [R + 1, n]
                        [np.bincount(d, minlength=len(common)) for d in draws])
    values = {}                                     # name -> {metric: [R + 1]}
    for name in needed:
        stacked = np.array([[o[c] for c in common] for o in runs[name]], dtype=np.float64)
        values[name] = metrics.weighted_metrics(np.moveaxis(stacked, 2, 0), weights)  # [3, S, n]

    def show(value, unit, sign="+"):
        point, lo, hi = value
        digits = 2 if unit == "kcal/mol" else 1
        return f"{point:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"

    lines = [f"{len(common)} conformations, seeds: "
             + ", ".join(f"{n} {len(runs[n])}" for n in needed), CLAIM_RULES]
    for name in needed:
        lines.append(f"  {name}: " + ", ".join(
            f"{m} {show(interval(values[name][m]), unit, '')}"
            for m, _, unit in CLAIM_METRICS + (BESIDE_METRIC,)))
    for claim, absent in claims:
        if not isinstance(claim, Claim):
            lines.append(f"claim {claim}: NOT CHECKED (no {' or '.join(absent)} row)")
            continue
        per_metric = collections.defaultdict(list)          # metric -> verdicts
        details = []
        for a, relation, b in claim.comparisons:
            details.append(f"    {a} {'beats' if relation == '>' else 'matches or beats'} {b}:")
            for metric, sign, unit in CLAIM_METRICS + (BESIDE_METRIC,):
                first, second = (a, b) if sign > 0 else (b, a)    # positive favours a
                diff = interval(values[first][metric] - values[second][metric])
                text = f"      {metric}: {first} - {second} = {show(diff, unit)} {unit}"
                if (metric, sign, unit) == BESIDE_METRIC:
                    details.append(text + " (beside, no verdict)")
                    continue
                verdict = comparison_verdict(relation, metric, diff[1], diff[2],
                                             values[a][metric][0], values[b][metric][0],
                                             success_floor)
                per_metric[metric].append(verdict)
                details.append(f"{text}: {verdict}")

        def overall(verdicts):
            if any(v == "fails" for v in verdicts):
                return "FAILS"
            if all(v == "holds" for v in verdicts):
                return "HOLDS"
            if all(v == "holds" or v.startswith("not decided") for v in verdicts):
                return f"NOT DECIDED (scorer floor, {success_floor:g} %)"
            return "NOT SHOWN"
        verdicts = {m: overall(per_metric[m]) for m, _, _ in CLAIM_METRICS}
        if claim.decided_on:
            head = "; ".join(f"decided on {m}: {verdicts[m]}" for m in claim.decided_on)
            others = [m for m, _, _ in CLAIM_METRICS if m not in claim.decided_on]
            head += " (the other metrics: " + ", ".join(f"{m} {verdicts[m]}" for m in others) + ")"
        else:
            head = ", ".join(f"{m} {verdicts[m]}" for m, _, _ in CLAIM_METRICS)
        lines.append(f"claim {claim.title}: {head}")
        lines += details
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Figures 1-3
# ---------------------------------------------------------------------------------------

FIGURES = ("fig1_nnp_error.png", "fig2_pct_violin.png", "fig3_pct_over_steps.png")


def draw_figures(named_summaries):
    """Figures 1-3 with every model in one picture; named_summaries: (name, summary).
    Returns {file name: matplotlib figure}. Fig. 1: median and p10-p90 band of the NNP's
    energy and forces MSE against the oracle along the optimization (models without NNP
    energies, as the RDKit row, are left out); Fig. 2: violins of pct_T over the
    non-diverged conformations, with mean and p10/p90 marks; Fig. 3: mean pct_t with its
    p10-p90 band (over the conformations not diverged at T), and pct_div_t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    figs = {}

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "energy_mse_kcal_mol2_per_step", "energy MSE, (kcal/mol)^2"),
                           (axes[1], "forces_mse_kcal_mol_A2_per_step",
                            "forces MSE, (kcal/mol/A)^2")):
        for k, (name, s) in enumerate(named_summaries):
            pts = [(t, x) for t, x in zip(s["steps"], s.get(key, []))
                   if x["mean"] is not None and x.get("p50") is not None]
            if pts:
                t, x = zip(*pts)
                ax.plot(t, [v["p50"] for v in x], marker="o", color=f"C{k}", label=name)
                ax.fill_between(t, [v["p10"] for v in x], [v["p90"] for v in x],
                                color=f"C{k}", alpha=0.25)
        ax.set(xscale="log", yscale="log", xlabel="step t", ylabel=label)
    fig.suptitle("Figure 1: NNP error along the optimization (median, p10-p90)")
    if axes[0].lines:
        axes[0].legend(fontsize="small")
    figs["fig1_nnp_error.png"] = fig

    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(named_summaries)), 4))
    values = [(k, name, [v for v in s.get("pct_T_values") or [] if np.isfinite(v)])
              for k, (name, s) in enumerate(named_summaries)]   # (colour, name, pct_T [kept])
    values = [v for v in values if v[2]]     # pct_T is +-inf for a start at its optimum (Eq. 4)
    if values:
        parts = ax.violinplot([v for _, _, v in values], showmeans=True, showextrema=False,
                              quantiles=[[0.1, 0.9]] * len(values))
        for body, (k, _, _) in zip(parts["bodies"], values):
            body.set_facecolor(f"C{k}")
        parts["cmeans"].set(color="k", linestyle="-")          # the mean
        parts["cquantiles"].set(color="k", linestyle="--")     # p10 and p90
    ax.set_xticks(range(1, len(values) + 1), [name for _, name, _ in values])
    ax.set_ylabel("pct(s_T), %")
    ax.set_title("Figure 2: optimization percentage\n(mean; p10, p90)")
    figs["fig2_pct_violin.png"] = fig

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for k, (name, s) in enumerate(named_summaries):
        # the steps with a pct_t (NaN where every conformation diverged at T)
        ok = [i for i, m in enumerate(s["pct_mean_per_step"]) if m is not None and np.isfinite(m)]
        if ok:
            a1.plot([s["steps"][i] for i in ok], [s["pct_mean_per_step"][i] for i in ok],
                    marker="o", color=f"C{k}", label=name)
        if ok and "pct_p10_per_step" in s:
            a1.fill_between([s["steps"][i] for i in ok], [s["pct_p10_per_step"][i] for i in ok],
                            [s["pct_p90_per_step"][i] for i in ok], color=f"C{k}", alpha=0.25)
        a2.plot(s["steps"], s["pct_div_per_step"], marker="o", color=f"C{k}", label=name)
    a1.set(xscale="log", xlabel="step t", ylabel="pct_t, %",
           title="Figure 3: pct_t (mean, p10-p90)")
    a2.set(xscale="log", xlabel="step t", ylabel="pct_div_t, %", title="diverged at t")
    a2.legend(fontsize="small")
    for ax in (*fig.axes, *figs["fig1_nnp_error.png"].axes):   # steps as plain numbers
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    figs["fig3_pct_over_steps.png"] = fig
    for fig in figs.values():
        fig.tight_layout()
    return figs


def save_figures(figs, out_dir):
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    for name, fig in figs.items():
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)


def plot(summary, out_dir):
    """This run's Figures 1-3 (draw_figures of one model): summary.json holds every
    plotted number."""
    save_figures(draw_figures([(os.path.basename(os.path.normpath(out_dir)), summary)]), out_dir)


# ---------------------------------------------------------------------------------------
# conformations.html (Appendix H): test conformations side by side in 3D
# ---------------------------------------------------------------------------------------

THREEDMOL_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "third_party", "3dmol", "3Dmol-min.js")
PANEL_SIZE = (300, 260)   # pixels, width x height of one 3D panel
ROW_WIDTH = 1200          # pixels: a row of more than 4 panels gets narrower ones


def panel_size(n_panels):
    """(width, height) in pixels of each of a row's n_panels 3D panels."""
    width, height = PANEL_SIZE
    return (width, height) if n_panels * width <= ROW_WIDTH else (ROW_WIDTH // n_panels, height)


def kabsch_align(positions, reference):
    """positions [n, 3] rotated and translated onto reference [n, 3] (same atom order), the
    rotation that minimizes the all-atom RMSD (Kabsch)."""
    p = positions - positions.mean(axis=0)
    q_center = reference.mean(axis=0)
    u, _, vt = np.linalg.svd(p.T @ (reference - q_center))                  # H = P^T Q
    d = np.sign(np.linalg.det(u @ vt))                                       # no reflection
    rotation = u @ np.diag([1.0, 1.0, d]) @ vt                               # [3, 3]
    return p @ rotation + q_center


def molecule_text(numbers, positions, smiles):
    """(text, format) for 3Dmol: SDF with the SMILES's bonds (without a SMILES, bonds RDKit
    perceives from the coordinates), or XYZ, bonds guessed by 3Dmol from distances, when
    RDKit cannot make the molecule (a SMILES that does not match the atoms)."""
    try:
        conf = data.Conformation(numbers=np.asarray(numbers), positions=positions, smiles=smiles)
        return Chem.MolToMolBlock(oracles.rdkit_molecule(conf)), "sdf"
    except data.DataError:
        symbols = [Chem.GetPeriodicTable().GetElementSymbol(int(z)) for z in numbers]
        lines = [f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(symbols, positions)]
        return f"{len(numbers)}\n{smiles or ''}\n" + "\n".join(lines) + "\n", "xyz"


def conformation_row(conf, e0, finals, rmsd):
    """One row of the page for a test conformation `conf` (with optimal_positions and
    optimal_energy): the initial s_0 (DFT energy e0, Hartree, None where the oracle failed),
    then one panel per method of `finals` [(title, s_T positions [n_atoms, 3], its DFT
    energy or None)] with its pct_T (Eq. 4), then the DFT optimum; rmsd(positions) gives the
    RMSD (A) to the DFT optimum. Also the 2D drawing of the molecule."""
    optimum = np.asarray(conf.optimal_positions, dtype=np.float64)
    panels = []
    for kind, title, positions, energy in (
            [("start", "initial s_0", conf.positions, e0)]
            + [("final", title, positions, energy) for title, positions, energy in finals]
            + [("optimum", "DFT optimum", optimum, conf.optimal_energy)]):
        positions = np.asarray(positions, dtype=np.float64)
        text, fmt = molecule_text(conf.numbers, kabsch_align(positions, optimum), conf.smiles)
        panel = {"title": title, "model": text, "format": fmt, "energy": energy,
                 "rmsd": float(rmsd(positions))}
        if kind == "final":
            panel["pct"] = pct_of_final(e0, energy, conf.optimal_energy)
        panels.append(panel)
    return {"title": f"conformation {conf.id}: {conf.smiles or ''} ({conf.n_atoms} atoms)",
            "e_opt": conf.optimal_energy, "panels": panels, "drawing": drawing_svg(conf)}


def pct_of_final(e0, e_final, e_opt):
    """Eq. 4's pct_T of a method's s_T (%), or why there is none: 'diverged' (E_T > E_0, as
    Sec. 6 counts it), 'no E_T' (the oracle failed at s_T) or 'no E_0'."""
    if e0 is None:
        return "no E_0"
    if e_final is None:
        return "no E_T"
    if metrics.diverged(e0, e_final):
        return "diverged"
    return metrics.pct_of_optimization(e0, e_final, e_opt)


def drawing_svg(conf, size=(220, 180)):
    """The molecule in 2D (RDKit's SVG) from its SMILES, else from the bonds perceived at
    the DFT optimum; None if RDKit cannot make it."""
    from rdkit.Chem import rdDepictor
    from rdkit.Chem.Draw import rdMolDraw2D
    try:
        if conf.smiles:
            mol = Chem.MolFromSmiles(conf.smiles)
        else:
            mol = Chem.RemoveHs(oracles.rdkit_molecule(data.Conformation(
                numbers=conf.numbers, positions=conf.optimal_positions)))
        if mol is None:
            return None
        mol = Chem.Mol(mol)
        mol.RemoveAllConformers()
        rdDepictor.Compute2DCoords(mol)
        drawer = rdMolDraw2D.MolDraw2DSVG(*size)
        drawer.DrawMolecule(mol)
        drawer.FinishDrawing()
    except (data.DataError, ValueError, RuntimeError):
        return None
    svg = drawer.GetDrawingText()
    return svg[svg.index("<svg"):]                     # inline: no XML declaration


def caption(panel, e_opt):
    """Text under a panel: DFT energy relative to the optimum, RMSD, and a method's pct_T."""
    if panel["energy"] is None:
        energy = "E<sub>DFT</sub>: none (the oracle failed here)"
    else:
        de = metrics.residual_energy(panel["energy"], e_opt)                 # Eq. 6
        energy = (f"E<sub>DFT</sub> &minus; E<sub>opt</sub> = {de:+.2f} kcal/mol"
                  f"<br>E<sub>DFT</sub> = {panel['energy']:.6f} Ha")
    pct = ""
    if "pct" in panel:
        pct = ("<br>pct<sub>T</sub> = " + (f"{panel['pct']:.1f} %"
                                           if isinstance(panel["pct"], float) else
                                           f"none: {html.escape(panel['pct'])}"))
    return (f"<b>{html.escape(panel['title'])}</b><br>{energy}"
            f"<br>RMSD to DFT optimum = {panel['rmsd']:.3f} &Aring;{pct}")


PAGE_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; }
.row { margin-bottom: 28px; }
.line { display: flex; align-items: flex-start; gap: 12px; }
.drawing { flex: none; }
.grid { position: relative; outline: 1px solid #ccc; }
.captions { display: grid; font-size: 13px; }
.captions div { padding: 4px 6px; }
"""

PAGE_SCRIPT = """
ROWS.forEach(function (row, i) {
  // one WebGL context per row (browsers allow only ~16 per page); its panels turn together
  var grid = $3Dmol.createViewerGrid("grid" + i,
                                     {rows: 1, cols: row.panels.length, control_all: true},
                                     {backgroundColor: "white"});
  row.panels.forEach(function (panel, j) {
    var viewer = grid[0][j];
    viewer.addModel(panel.model, panel.format);
    viewer.setStyle({}, {stick: {radius: 0.14}, sphere: {scale: 0.25}});
    viewer.zoomTo();
    viewer.render();
  });
});
"""


def write_conformations_page(path, rows, title, methods=None):
    """Write the self-contained page: 3Dmol.js inlined, rows as JSON in the page. methods:
    what the middle panels show (for the text above the rows)."""
    with open(THREEDMOL_JS) as f:
        threedmol = f.read()
    body = []
    for i, row in enumerate(rows):
        n = len(row["panels"])
        width, height = panel_size(n)
        captions = "".join(f"<div>{caption(p, row['e_opt'])}</div>" for p in row["panels"])
        drawing = f'<div class="drawing">{row["drawing"]}</div>' if row.get("drawing") else ""
        body.append(f'<div class="row"><h3>{html.escape(row["title"])}</h3>'
                    f'<div class="line">{drawing}<div>'
                    f'<div class="grid" id="grid{i}" style="width: {n * width}px; '
                    f'height: {height}px"></div>'
                    f'<div class="captions" style="grid-template-columns: '
                    f'repeat({n}, {width}px)">{captions}</div></div></div></div>')
    # "</" never ends the script element early inside the JSON
    rows_json = json.dumps([{"panels": [{"model": p["model"], "format": p["format"]}
                                        for p in row["panels"]]}
                            for row in rows]).replace("</", "<\\/")
    shown = html.escape(methods or "the optimized one s_T (by the NNP; by MMFF for the RDKit row)")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PAGE_STYLE}</style>
<script>/* 3Dmol.js 2.5.5, BSD-3-Clause, https://3dmol.org: golf's third_party/3dmol/LICENSE */
{threedmol}</script>
</head><body>
<h2>{html.escape(title)}</h2>
<p>Per test conformation (Appendix H): the molecule in 2D, the initial conformation s_0,
{shown}, and the DFT optimum. Energies are DFT (the genuine oracle) relative to the DFT
optimum E<sub>opt</sub>; pct<sub>T</sub> is Eq. 4's share of the DFT optimization achieved
(none where the method diverged, E<sub>T</sub> &gt; E<sub>0</sub>); RMSD is to the DFT
optimum, symmetry-aware, on heavy atoms. The 3D conformations are rotated onto the optimum;
drag a panel to turn the row.</p>
{"".join(body)}
<script>
var ROWS = {rows_json};
{PAGE_SCRIPT}
</script>
</body></html>
"""
    with safe_io.atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(page)
