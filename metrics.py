"""The paper's metrics (Eq. 4-8, Sec. 6, App. F) and the bootstrap of their intervals: pure
functions of energies (Hartree, NaN where the oracle gave none) and RMSDs, numpy only, so
report.py reads them without torch. evaluate.py writes summary.json with them, report.py
decides the claims and captions the 3D page with them.

With E_t = E^DFT(s_t), E_0 at the start s_0 and E_opt at the DFT optimum s_opt:
    pct(s_t)   = 100 (E_0 - E_t) / (E_0 - E_opt)          Eq. 4, % of the optimization
    E_res(s_t) = E_t - E_opt                              Eq. 6, kcal/mol
    diverged   : E_t > E_0 (Sec. 6), or no E_t (the oracle failed at s_t), or no E_0
    success    : E_res(s_t) < 1 kcal/mol                  Eq. 8, chemical accuracy
pct, E_res and success are averaged over the conformations that did not diverge; pct_div is
the share of all that did; "of all" (pct_success_all) is the successes over all.
COV / MAT (App. F): per molecule, the share of DFT-optimal conformations with an optimized
one within RMSD delta, and the mean smallest RMSD.

    aggregate(e0, e_T, e_opt)             Table 2's numbers over conformations
    aggregate_steps(e0, e_steps, e_opt)   Fig. 3's: the same at every eval step (Sec. 6)
    weighted_metrics(energies, weights)   the claims' numbers under bootstrap weights,
                                          seeds pooled
    resamples(n, n_resamples, seed)       one bootstrap draw of n of n conformations
    percentile_interval(values, level)    its [lo, hi]
    bootstrap_interval(columns, stat)     resamples + percentile_interval of any statistic
    coverage_and_matching(gen, ref, rmsd) App. F for one molecule
"""
import numpy as np

from data import HARTREE_TO_KCAL

CHEMICAL_ACCURACY = 1.0   # kcal/mol: Eq. 8's success is E_res below it (strictly)


# ---------------------------------------------------------------------------------------
# One conformation (Eq. 4, 6, 8; Sec. 6's divergence)
# ---------------------------------------------------------------------------------------

def pct_of_optimization(e0, et, e_opt):
    """Eq. 4: percentage of the DFT optimization s_0 -> s_opt achieved at s_t."""
    return 100.0 * (e0 - et) / (e0 - e_opt)


def residual_energy(et, e_opt):
    """Eq. 6: E_res(s_t) = E_t - E_opt, in kcal/mol."""
    return (et - e_opt) * HARTREE_TO_KCAL


def diverged(e0, et):
    """Sec. 6: the optimization made it worse, E_t > E_0; also no E_t (NaN: the oracle
    failed at s_t, in practice atoms the NNP pulled apart) or no E_0 (NaN: the oracle
    failed at s_0). Arrays [n] -> bool [n]."""
    e0, et = np.asarray(e0, dtype=np.float64), np.asarray(et, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(e0) | ~np.isfinite(et) | (et > e0)


def succeeded(e_res):
    """Eq. 8: E_res < 1 kcal/mol (chemical accuracy); e_res in kcal/mol."""
    return e_res < CHEMICAL_ACCURACY


# ---------------------------------------------------------------------------------------
# Table 2 and Fig. 3 (summary.json)
# ---------------------------------------------------------------------------------------

def aggregate(e0, et, e_opt):
    """Table 2's numbers for one step over many conformations (arrays [n] of Hartree).
    Diverged conformations count in pct_div only; the others give pct (mean, std), E_res
    (mean) and pct_success; pct_success_all is the same successes over all n. n_failed:
    no E_t; n_no_e0: no E_0 (both diverged)."""
    e0, et, e_opt = (np.asarray(x, dtype=np.float64) for x in (e0, et, e_opt))
    failed = ~np.isfinite(et)
    lost = diverged(e0, et)                                                # [n]
    keep = ~lost
    pct = pct_of_optimization(e0[keep], et[keep], e_opt[keep])             # Eq. 4
    e_res = residual_energy(et[keep], e_opt[keep])                         # Eq. 6
    n = len(et)
    nan = float("nan")
    return {"n": int(n), "n_failed": int(failed.sum()), "n_no_e0": int((~np.isfinite(e0)).sum()),
            "pct_mean": float(pct.mean()) if keep.any() else nan,
            "pct_std": float(pct.std()) if keep.any() else nan,
            "pct_div": float(100.0 * lost.mean()) if n else nan,
            "e_res_mean_kcal_mol": float(e_res.mean()) if keep.any() else nan,
            "pct_success": float(100.0 * succeeded(e_res).mean()) if keep.any() else nan,
            # the same successes over all n conformations (a diverged one never succeeds)
            "pct_success_all": float(100.0 * succeeded(e_res).sum() / n) if n else nan}


# aggregate's numbers that summary.json holds at s_T and per eval step
STEP_METRICS = ("pct_mean", "pct_std", "pct_div", "e_res_mean_kcal_mol", "pct_success",
                "pct_success_all")
# the ones whose 95 % bootstrap interval summary.json and the table carry
INTERVAL_METRICS = ("pct_mean", "pct_div", "e_res_mean_kcal_mol", "pct_success",
                    "pct_success_all")


def aggregate_steps(e0, e_steps, e_opt):
    """Figure 3's curves: aggregate's numbers at every eval step, e_steps [n, n_steps]
    Hartree (NaN: oracle failed), its last column s_T. As Sec. 6: pct_div_t is the share of
    all n diverged at t (E_t > E_0, or no E_t, or no E_0); pct_t, E_res_t and the successes
    are over the conformations that did not diverge at T, the same set at every t (one that
    diverged at T is left out at every t; a kept one with E_t > E_0 at t < T counts with its
    negative pct_t; one whose oracle failed at t < T only is left out at t: n_failed).
    The last step is exactly aggregate(e0, e_steps[:, -1], e_opt). Also the p10/p50/p90 of
    pct_t over the kept set (Fig. 3's band)."""
    e0, e_steps, e_opt = (np.asarray(x, dtype=np.float64) for x in (e0, e_steps, e_opt))
    n = len(e0)
    e_T = e_steps[:, -1] if n else np.zeros(0)
    keep_T = ~diverged(e0, e_T)                                           # [n]
    out = []
    for t in range(e_steps.shape[1]):
        et = e_steps[:, t]
        step = aggregate(e0, et, e_opt)          # n, n_failed, pct_div at t (over all n)
        scored = keep_T & np.isfinite(et)        # the T-kept set, with an E_t
        pct = pct_of_optimization(e0[scored], et[scored], e_opt[scored])
        e_res = residual_energy(et[scored], e_opt[scored])
        has = scored.any()
        nan = float("nan")
        step.update({
            "pct_mean": float(pct.mean()) if has else nan,
            "pct_std": float(pct.std()) if has else nan,
            "e_res_mean_kcal_mol": float(e_res.mean()) if has else nan,
            "pct_success": float(100.0 * succeeded(e_res).mean()) if has else nan,
            "pct_success_all": float(100.0 * succeeded(e_res).sum() / n) if n else nan,
            **{f"pct_p{q}": float(np.percentile(pct, q)) if has else nan for q in (10, 50, 90)}})
        out.append(step)
    return out


# ---------------------------------------------------------------------------------------
# The claims: the same metrics under bootstrap weights, a model's seeds pooled
# ---------------------------------------------------------------------------------------

def weighted_metrics(energies, weights):
    """aggregate's pct_mean, pct_div, e_res_mean_kcal_mol, pct_success and pct_success_all
    (named pct_T, pct_div, E_res, pct_success, of all) of one model under bootstrap
    weights. energies: (e0, e_T, e_opt), each [n_seeds, n] Hartree (NaN: no energy);
    weights [n_resamples, n]: how often each conformation is drawn (a row of ones: the
    point estimate). A model's seeds are pooled: its conformations of every seed together.
    Returns {metric: [n_resamples]}."""
    e0, e_T, e_opt = (np.asarray(x, dtype=np.float64) for x in energies)
    lost = diverged(e0, e_T)                                                  # [S, n]
    kept = ~lost
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(kept, pct_of_optimization(e0, e_T, e_opt), 0.0)        # Eq. 4
        e_res = np.where(kept, residual_energy(e_T, e_opt), 0.0)              # Eq. 6
        success = kept & succeeded(e_res)                                     # Eq. 8
        n_all = weights.sum(axis=1) * e0.shape[0]                             # [R]
        n_kept = weights @ kept.sum(axis=0)                                   # [R]
        return {"pct_T": weights @ pct.sum(axis=0) / n_kept,
                "pct_div": 100.0 * (weights @ lost.sum(axis=0)) / n_all,
                "E_res": weights @ e_res.sum(axis=0) / n_kept,
                "pct_success": 100.0 * (weights @ success.sum(axis=0)) / n_kept,
                "of all": 100.0 * (weights @ success.sum(axis=0)) / n_all}


# ---------------------------------------------------------------------------------------
# The bootstrap: percentile intervals over conformations
# ---------------------------------------------------------------------------------------

def resamples(n, n_resamples, seed):
    """n of the n conformations drawn with replacement, n_resamples times, with numpy's
    default_rng(seed): indices [n_resamples, n]. Every statistic of one evaluation
    (evaluate.py) and every model and seed of a claim (report.py) use one draw."""
    if not n:
        return np.zeros((0, 0), dtype=int)
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_interval(values, level=95.0):
    """[lo, hi]: the (100 - level) / 2 and (100 + level) / 2 percentiles of the finite
    values (a resample where a mean is NaN, e.g. all diverged, is left out); [nan, nan] if
    none is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    q = [(100.0 - level) / 2, (100.0 + level) / 2]
    return [float(x) for x in np.percentile(v, q)] if len(v) else [float("nan")] * 2


def bootstrap_interval(columns, statistic, n_resamples=2000, seed=0, level=95.0):
    """Percentile bootstrap interval over conformations: the same resampled rows of every
    column (so pct_div and the means over the non-diverged of one resample come from one
    resampled test set), statistic(*resampled columns) of each resample, then
    percentile_interval. statistic returns a float or a dict of floats; returns [lo, hi]
    or {key: [lo, hi]}."""
    columns = [np.asarray(c) for c in columns]
    values = [statistic(*(c[i] for c in columns))                       # [n_resamples]
              for i in resamples(len(columns[0]), n_resamples, seed)]
    if values and isinstance(values[0], dict):
        return {k: percentile_interval([v[k] for v in values], level) for k in values[0]}
    return percentile_interval(values, level)


# ---------------------------------------------------------------------------------------
# COV / MAT (App. F)
# ---------------------------------------------------------------------------------------

def coverage_and_matching(generated, reference, rmsd, delta=0.5):
    """Appendix F for one molecule: COV = share of reference conformations with a generated
    one within RMSD < delta (A); MAT = mean over references of the smallest RMSD."""
    d = np.array([[rmsd(g, r) for g in generated] for r in reference])   # [n_ref, n_gen]
    closest = d.min(axis=1)
    return float(100.0 * (closest < delta).mean()), float(closest.mean())
