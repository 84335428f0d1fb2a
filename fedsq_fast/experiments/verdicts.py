"""The paper's claims and their verdicts, by rules fixed before any run: where 95% intervals of
paired differences over seeds lie (:func:`interval_verdict`, the one place that reads an
interval), per comparison and overall."""
from __future__ import annotations

# Paired comparisons the report makes (first vs second), where both were run.
COMPARISONS = (("fedsq", "fedavg"), ("fedsq", "fedprox"), ("fedsq+fedprox", "fedprox"),
               ("fedsq+fedprox", "fedavg"))
GATE_METHODS = ("fedavg", "fedprox")  # plain networks: their own gates drift from the pretrained ones


NOT_TESTABLE = "not testable (fewer than 2 seeds)"
NOT_MEASURED = "not measurable (no gate flips recorded)"


def interval_verdict(ci, at: float, below: str, above: str, between: str, closed_above: bool = False) -> str:
    """Where the interval ``ci`` (:func:`~.stats.paired_ci`) lies relative to ``at``: wholly below
    (``hi < at``), wholly above (``lo > at``, or ``lo >= at`` with ``closed_above``) or across it;
    NOT_TESTABLE without an interval (fewer than 2 seeds)."""
    if ci["lo"] is None:
        return NOT_TESTABLE
    if closed_above and ci["lo"] >= at:
        return above
    if ci["hi"] < at:
        return below
    if ci["lo"] > at:
        return above
    return between


def direction(ci) -> str:
    """Where a paired interval lies relative to 0 (a description, not a verdict)."""
    if not ci or ci.get("n", 0) == 0:
        return "no runs"
    if ci.get("lo") is None:
        return "n=1"
    return interval_verdict(ci, 0.0, "lower", "higher", "no difference detected")


def ci_txt(c, nd=4, pct=False) -> str:
    """A paired interval as ``mean [lo, hi] (n=N)`` (``pct``: accuracy in percentage points)."""
    f = (lambda x: f"{100 * x:+.2f} pp") if pct else (lambda x: f"{x:+.{nd}f}")
    if c["n"] == 0:
        return "n/a"
    if c["lo"] is None:
        return f"{f(c['mean'])} (n=1, no interval)"
    return f"{f(c['mean'])} [{f(c['lo'])}, {f(c['hi'])}] (n={c['n']})"

def claims(res, suite) -> list:
    """Verdicts from the fixed rules (95% t intervals of paired differences over seeds)."""
    margin = res["noninferiority_margin"]
    out = []
    parts = res["partitions"]
    dirichlet = [p for p in parts if p.startswith("dirichlet")]
    main = [c for c in res["comparisons"] if c["b"] in ("fedavg", "fedprox") and c["a"].startswith("fedsq")
            and ":" not in c["a"]]

    # 1. same-or-better BVA
    lines, verdicts = [], []
    for c in main:
        ci = c["bva"]
        v = interval_verdict(ci, -margin, below="fails", above="holds", between="inconclusive", closed_above=True)
        verdicts.append(v)
        lines.append(f"{c['partition']}, {c['a']} vs {c['b']}: ΔBVA {ci_txt(ci, pct=True)} -> {v}")
    out.append({"claim": "FedSQ keeps the best validation accuracy (same or better than FedAvg / FedProx)",
                "rule": f"holds where the 95% interval of the paired BVA difference lies above -{100 * margin:g} pp "
                        f"(non-inferiority margin); fails where it lies below -{100 * margin:g} pp; "
                        "otherwise inconclusive",
                "verdict": overall(verdicts), "details": lines})

    # 2. fewer rounds-to-best under Dirichlet
    lines, verdicts = [], []
    for c in main:
        if c["partition"] not in dirichlet or c["b"] not in ("fedavg", "fedprox"):
            continue
        if c["a"] == "fedsq+fedprox" and c["b"] == "fedavg":
            continue  # the claim is FedSQ vs each baseline; FedSQ+FedProx is judged against FedProx
        for key, label in (("rounds_to_best", "rounds-to-best"), ("rounds_to_target", "rounds to target")):
            ci = c[key]
            v = interval_verdict(ci, 0.0, below="holds", above="contradicted (more rounds)", between="not shown")
            if key == "rounds_to_best":
                verdicts.append(v)
            lines.append(f"{c['partition']}, {c['a']} vs {c['b']}: Δ{label} {ci_txt(ci, nd=2)} -> {v}")
    out.append({"claim": "FedSQ reaches its best in fewer rounds than FedAvg and FedProx under Dirichlet splits",
                "rule": "holds where the 95% interval of the paired rounds-to-best difference lies below 0; "
                        "contradicted where it lies above 0; otherwise not shown. Rounds to "
                        f"{res['target_fraction']:g} x the baseline's BVA is reported the same way "
                        "(not reached = rounds + 1) but does not decide the verdict",
                "verdict": overall(verdicts, good="holds", bad="contradicted (more rounds)"), "details": lines})

    # 3. gates settle early (premise; plain-network runs)
    lines, verdicts = [], []
    for g in res["gates"]:
        if g["method"] not in GATE_METHODS:
            continue
        if g.get("gate_measured_runs", g["n"]) < g["n"]:
            lines.append(f"{g['partition']}, {g['method']}: gate flips not measured in "
                         f"{g['n'] - g.get('gate_measured_runs', g['n'])}/{g['n']} runs (the network has no "
                         f"gate sites to measure, e.g. a SiLU/GELU network trained without FedSQ) -> {NOT_MEASURED}")
            continue
        ci = g["settle_diff"]
        v = interval_verdict(ci, 0.0, below="holds", above="contradicted (weights settle first)",
                             between="not shown")
        verdicts.append(v)
        gm, gs = g["gate_change_rR"]
        lines.append(f"{g['partition']}, {g['method']}: gates settle at round {g['gate_settle'][0]:.2f} "
                     f"({g['gate_settled_runs']}/{g['n']} runs settled), weights at {g['weight_settle'][0]:.2f} "
                     f"({g['weight_settled_runs']}/{g['n']}); Δ {ci_txt(ci, nd=2)} -> {v}; "
                     f"{100 * gm:.2f}% of the pretrained gates flipped by round {g['rR']}")
    out.append({"claim": "Premise: gates (ReLU regimes) settle earlier than the weights",
                "rule": f"a per-round change has settled from the first round after which it stays <= "
                        f"{res['settle_threshold']:g} x its round-1 value (gates: fraction flipped since the "
                        "previous round on the probe batch; weights: ||w_r - w_(r-1)||); never = rounds + 1. "
                        "Holds where the 95% interval of the paired difference (gate round - weight round) "
                        "lies below 0",
                "verdict": (overall(verdicts, good="holds", bad="contradicted (weights settle first)")
                            if verdicts or not lines else NOT_MEASURED),
                "details": lines})

    # robustness (federated evaluation), only where the runs have it
    if res.get("client_eval"):
        out.append(robustness_claim(res, main, dirichlet))

    # 4. unfreezing vs fixed gates (the experiment that would settle the claim)
    lines, verdicts = [], []
    for c in res["comparisons"]:
        if ":" not in c["a"] or c["b"] != "fedsq":
            continue
        b, r = c["bva"], c["rounds_to_best"]
        if b["lo"] is None:
            v = NOT_TESTABLE
        elif b["lo"] > 0 or (r["hi"] is not None and r["hi"] < 0 and b["lo"] >= -margin):
            v = "unfreezing beats fixed gates"
        elif b["hi"] < -margin:
            v = "fixed gates beat unfreezing"
        else:
            v = "fixed gates not beaten"
        verdicts.append(v)
        lines.append(f"{c['partition']}, {c['a']} vs fedsq: ΔBVA {ci_txt(b, pct=True)}, "
                     f"Δrounds-to-best {ci_txt(r, nd=2)} -> {v}")
    if lines:
        out.append({"claim": "Fixed gates are not beaten by unfreezing / refreshing the structural copy",
                    "rule": "unfreezing beats fixed gates where its BVA is higher (95% interval of the paired "
                            "difference above 0), or it needs fewer rounds-to-best (interval below 0) at "
                            f"non-inferior BVA (interval above -{100 * margin:g} pp); "
                            "fixed gates beat unfreezing where its BVA interval lies below the margin",
                    "verdict": overall(verdicts, good="fixed gates not beaten", bad="unfreezing beats fixed gates"),
                    "details": lines})
    return out


ROBUSTNESS_KEYS = (("client_acc_worst", "worst-client accuracy"), ("client_acc_p10", "10th-percentile client accuracy"))


def robustness_claim(res, main, dirichlet) -> dict:
    """The paper's robustness claim under Dirichlet splits, judged on federated evaluation (the
    final global model on every client's own test split): FedSQ's worst-client and 10th-percentile
    client accuracy against each baseline's, paired by seed, with the BVA claim's
    non-inferiority rule and margin. Each (partition, comparison, measure) is one case; where an
    interval lies wholly above 0 the detail says so (better, not only non-inferior)."""
    margin = res["noninferiority_margin"]
    lines, verdicts = [], []
    for c in main:
        if c["partition"] not in dirichlet or c["a"] == "fedsq+fedprox" and c["b"] == "fedavg":
            continue
        for key, label in ROBUSTNESS_KEYS:
            ci = c.get(key)
            if not ci or ci["n"] == 0:
                continue
            v = interval_verdict(ci, -margin, below="fails", above="holds", between="inconclusive",
                                 closed_above=True)
            verdicts.append(v)
            lines.append(f"{c['partition']}, {c['a']} vs {c['b']}: Δ{label} {ci_txt(ci, pct=True)} -> {v}"
                         + (f" ({c['a']} {direction(ci)})" if ci["lo"] is not None else ""))
    return {"claim": "FedSQ is robust under Dirichlet splits: its worst and 10th-percentile clients are served at "
                     "least as well as FedAvg's / FedProx's (federated evaluation)",
            "rule": f"for the final global model evaluated on every client's own test split, each of worst-client "
                    f"and 10th-percentile (numpy 'lower') client accuracy: holds where the 95% interval of the "
                    f"paired difference over seeds lies above -{100 * margin:g} pp (the BVA claim's non-inferiority "
                    f"margin); fails where it lies below -{100 * margin:g} pp; otherwise inconclusive. An interval "
                    "wholly above 0 is reported as higher",
            "verdict": overall(verdicts), "details": lines}


def overall(verdicts, good="holds", bad="fails") -> str:
    """A claim's verdict from its cases' verdicts (``good``: the case holds; ``bad``: it fails)."""
    if not verdicts:
        return "not tested (no runs)"
    if all(v.startswith("not testable") for v in verdicts):
        return "not testable yet (fewer than 2 seeds per cell)"
    n = len(verdicts)
    cnt = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    summary = ", ".join(f"{k}: {c}/{n}" for k, c in cnt.items())
    if all(v == good or v.startswith("fixed gates beat") for v in verdicts):
        return f"HOLDS in every tested case ({summary})"
    if any(v == bad for v in verdicts):
        return f"DOES NOT HOLD in {cnt[bad]}/{n} cases ({summary})"
    return f"NOT SHOWN ({summary})"


