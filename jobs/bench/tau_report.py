"""The τ experiment's printed report: per source and counterfactual, the anchor curves and the chosen τ, and
their paired comparison with an earlier run's (``paired_vs_baseline``)."""

from __future__ import annotations

import numpy as np


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def paired_vs_baseline(report: dict, baseline: dict, seed: int = 0, resamples: int = 2000) -> dict:
    """Per source, counterfactual and τ: the mean over users of (this run's F1 − the baseline run's F1), with a
    percentile bootstrap 95% CI over users, and how many users are worse and better. Only users and τ both runs
    scored are compared; a different user set is an error (the comparison would not be paired)."""
    out: dict = {}
    for source, res in report["sources"].items():
        for cf, c in res["counterfactuals"].items():
            try:
                ref = {r["tau"]: r["user_f1"] for r in baseline["sources"][source]["counterfactuals"][cf]["absolute"]}
            except KeyError:
                continue
            rows = []
            for r in c["absolute"]:
                if r["tau"] not in ref:
                    continue
                if set(r["user_f1"]) != set(ref[r["tau"]]):
                    raise ValueError(f"{source}/{cf}: the baseline scored other users; a paired comparison needs "
                                     "the same users (same --users, --partition, --pool_users and --seed)")
                users = sorted(r["user_f1"])
                diff = np.asarray([r["user_f1"][u] - ref[r["tau"]][u] for u in users], dtype=float)
                rng = np.random.default_rng(seed)
                boots = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
                rows.append({"tau": r["tau"], "mean_delta_f1": round(float(diff.mean()), 4),
                             "ci95": [round(float(np.percentile(boots, 2.5)), 4),
                                      round(float(np.percentile(boots, 97.5)), 4)],
                             "users_worse": int((diff < 0).sum()), "users_better": int((diff > 0).sum()),
                             "users": len(users)})
            out.setdefault(source, {})[cf] = rows
    return out


def print_report(report: dict) -> None:
    head = (f"{'anchors':>14}{'/user':>7}{'fallbk':>7}{'P':>7}{'R':>7}{'F1':>7}{'lift':>6}"
            f"{'P':>8}{'R':>7}{'F1':>7}{'±se':>6}{'lift':>6}")
    for source, res in report["sources"].items():
        for cf, c in res["counterfactuals"].items():
            t = res["timing"]
            first = c["absolute"][0]
            print(f"\n{source} / {cf}: {res['users']} users, {first['scored_types']} scored word types, "
                  f"{first['distinctive_types']} distinctive (base rate {first['base_rate']:.3f}); "
                  f"{res['reference_users']} reference users, rarity < {report['config']['rarity']:g}; "
                  f"scoring (all counterfactuals) {t['seconds']} s for {t['users_scored']} users, "
                  f"{t['users_cached']} from the cache")
            print(f"{'':>14}{'':>14}{'micro':^27}{'macro':^34}")
            print(head)

            def line(label: str, r: dict) -> None:
                mi, ma = r["micro"], r["macro"]
                print(f"{label:>14}{r['anchors_per_user']:>7.1f}{r.get('users_at_fallback', 0):>7d}"
                      f"{mi['precision']:>7.3f}{mi['recall']:>7.3f}{mi['f1']:>7.3f}{_fmt(mi['lift'], '.2f'):>6}"
                      f"{_fmt(ma['precision']):>8}{_fmt(ma['recall']):>7}{_fmt(ma['f1']):>7}"
                      f"{ma['f1_se']:>6.3f}{_fmt(ma['lift'], '.2f'):>6}")
            for r in c["absolute"]:
                line(f"τ={r['tau']:g}", r)
            for r in c["percentile"]:
                line(f"p{r['percentile']:g}", r)
            for name, r in c["references"].items():
                line("all words" if name.startswith("all") else "in>=2 items", r)
            rec = c["recommended"]
            print(f"recommended τ = {rec['tau']:g} nats (macro F1 {rec['macro_f1']:.3f} ± {rec['macro_f1_se']:.3f}, "
                  f"{rec['users_at_fallback']}/{rec['users']} users at the top-{report['config']['min_anchors']} "
                  f"fallback); largest τ within 1 SE: {rec['tau_within_1se']:g} "
                  f"(macro F1 {rec['macro_f1_within_1se']:.3f})")
            print("bootstrap over users, share of resamples each τ wins: "
                  + ", ".join(f"τ={t}: {v:.0%}" for t, v in rec["bootstrap_wins"].items()))
            paired = report.get("paired_vs_baseline", {}).get(source, {}).get(cf)
            if paired:
                print(f"paired against {report.get('baseline')} (this run − baseline, per user; 95% bootstrap CI):")
                for r in paired:
                    print(f"  τ={r['tau']:g}: macro ΔF1 {r['mean_delta_f1']:+.4f} [{r['ci95'][0]:+.4f}, "
                          f"{r['ci95'][1]:+.4f}], {r['users_worse']} users worse, {r['users_better']} better "
                          f"of {r['users']}")
