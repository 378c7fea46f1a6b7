"""The summary table a run prints on stderr, read from its JSON report."""
from __future__ import annotations


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fidelity_lines(prefix: str, part: dict) -> list[str]:
    """One line per output: relative L2 error (and top-1 agreement) before -> after a compensation pass."""
    out = []
    for name, after in part["fidelity_after"].items():
        before = part["fidelity_before"][name]
        extra = f", top-1 agreement {before['top1']:.0%} -> {after['top1']:.0%}" if "top1" in after else ""
        out.append(f"{prefix}: '{name}' rel. L2 error {before['rel_l2']:.3f} -> {after['rel_l2']:.3f}{extra}")
    return out


def _fidelity_line(fid: dict) -> str:
    """The held-out fidelity and, with --max-drop, what the guard decided."""
    line = f"fidelity      {fid['drop_pct']:.2f} % {fid['metric']}, on {fid['on']}"
    if "data-free" in fid["on"]:   # synthesized or random inputs: the model's real inputs may fare otherwise
        line += "; without data this is only an estimate: --calib measures it on your inputs"
    guard = fid.get("guard")
    if guard:
        line += f"\nguard         --max-drop {guard['max_drop_pct']:g} %: {guard['outcome']}"
    return line


def _search_line(s: dict) -> str:
    """policy, evaluations (how many were new), best reward and its metric, search and setup time."""
    measured = s.get("measured")
    new = f" ({measured} measured)" if measured is not None and measured != s["evaluations"] else ""
    at = f" at #{s['best_index'] + 1}" if s.get("best_index") is not None else ""
    ex = s.get("executor") or {}
    where = f" on Ray ({ex.get('workers')} workers)" if ex.get("kind") == "ray" else ""
    return (f"search        {s['policy']}: {s['evaluations']} evaluation{'s' * (s['evaluations'] != 1)}{new}, "
            f"best reward {s['best_reward']:.5f} ({s['metric']}){at}, {s['search_s']:.1f} s{where} "
            f"(+ {s['setup_s']:.1f} s setup)")


def _latency_line(lat: dict) -> str:
    """The latency budget's outcome: measured end to end after the correction, or why it was not measured."""
    where = f"batch {lat.get('batch')}, {lat.get('threads')} thread(s)"
    if lat.get("measured_ms") is not None:
        line = (f"latency       {lat['measured_ms']:.3f} ms measured (median) for a {lat['budget_ms']:.3f} ms "
                f"budget, {where}")
        if lat.get("converged") is False:
            line += (f"  ** not within [{lat['band'][0]:g}, {lat['band'][1]:g}] x the budget after "
                     f"{len(lat.get('probes', []))} probes: too noisy or too small to time **")
        return line
    return (f"latency       {lat.get('search_predicted_ms', float('nan')):.3f} ms predicted for a "
            f"{lat.get('budget_ms', float('nan')):.3f} ms budget, {where}; {lat.get('fit', 'not measured')}")


def summary(rep: dict) -> str:
    m, p, g, v = rep["macs"], rep["params"], rep["groups"], rep["verification"]
    lines = [
        f"{'':14}{'before':>12}{'after':>12}{'ratio':>9}",
        f"{'MACs':14}{human(m['before']):>12}{human(m['after']):>12}{m['ratio']:>9.3f}",
        f"{'params':14}{human(p['before']):>12}{human(p['after']):>12}{p['ratio']:>9.3f}",
        (f"groups        {g['total']} total, {g['pruned']} pruned, {g['frozen']} frozen, "
        f"{g['partially_frozen']} partially frozen"),
    ]
    if g.get("coarse_spared"):
        lines.append(f"{'':14}{len(g['coarse_spared'])} groups of fewer than 8 units (e.g. attention heads) kept whole: "
                     f"the other groups met the budget")
    pat = rep.get("patterns")
    if pat:
        pm = pat["macs"]
        lines.append(f"{'MACs pattern':14}{human(pm['original']):>12}{human(pm['pattern_aware']):>12}"
                     f"{pm['pattern_aware_ratio']:>9.3f}  (a kernel that skips the zeros; onnxruntime runs dense)")
        lines.append(f"patterns      <= {pat['k']} positions in {pat['kernels']} kernels of {pat['layers']} convs, "
                     f"{pat['kernels_emptied']} emptied; libraries " +
                     ", ".join(f"{k}: {n} shapes" for k, n in pat["libraries"].items()))
    st = rep.get("storage")
    if st:
        lines.append(f"storage       sparse: {human(st['file_bytes'])}B vs {human(st['file_bytes_dense'])}B dense "
                     f"({st['file_ratio']:.3f}x), outputs equal the dense model's")
    if rep.get("search"):
        lines.append(_search_line(rep["search"]))
        if rep["search"].get("latency"):
            lines.append(_latency_line(rep["search"]["latency"]))
    if v["status"] == "passed":
        before = v.get("checked_before_squashing", {})
        worst = max([e for k, e in v["max_rel_error"].items() if k not in before]
                    + [b["max_rel_error"] for b in before.values()], default=0.0)
        half = v.get("rtol_half_precision") or {}
        bound = f"{v['rtol']:g}" if not half else f"{max(half.values()):g} for float16 outputs"
        lines.append(f"verification  passed (max rel. error {worst:.2e} <= {bound}, checker full)")
        for out, b in before.items():
            lines.append(f"              output '{out}' is saturated on random inputs: compared before its "
                         f"squashing ops, at '{b['tensor']}'")
        if v.get("compared_on"):
            lines.append(f"              compared on the {v['compared_on']}")
    else:
        lines.append(f"verification  {v['status']}  ** the output model was NOT verified **")
    comp = rep.get("compensation")
    if comp:
        lines += _fidelity_lines(f"compensation  fold-constants on {comp['folded_sinks']} sinks", comp)
    rec = rep.get("reconstruction")
    if rec:
        names = " + ".join(p["pass"] for p in rec["passes"]) or "none"
        lines += _fidelity_lines(f"reconstruct   {names} on {rec['fidelity_on']}", rec)
        widened = sum(p.get("scales_widened", 0) for p in rec["passes"])
        if widened:
            lines.append(f"              {widened} quantized weight(s): scales widened to hold the refit values "
                         f"(integers stay integers)")
    fid = rep.get("fidelity")
    if fid:
        lines.append(_fidelity_line(fid))
    prog = rep.get("progressive")
    if prog:
        macs0 = max(m["before"], 1)
        chain = " -> ".join(f"{st['macs_after'] / macs0:.3f}" for st in prog["per_step"])
        tuned = sum(t["epochs"] for t in prog["finetune"])
        lines.append(f"steps         {prog['steps']}, MACs kept {chain}"
                     + (f"; fine-tuned {tuned} epoch(s) between steps" if tuned else "")
                     + "; every step verified against its input" * all(
                         st["verification"] == "passed" for st in prog["per_step"]))
    alloc = rep.get("allocation") or {}
    if alloc.get("candidates"):
        errs = ", ".join(f"{name} {c['error']:.3g}" + (" (outside --max-drop)" if c.get("within_guard") is False
                                                       else "") for name, c in alloc["candidates"].items())
        lines.append(f"allocation    auto: {alloc['chosen']} kept, the closer of two refit plans ({alloc['metric']} "
                     f"on {alloc['on']}: {errs})")
    imp = rep.get("importance") or {}
    if imp.get("data") and imp["data"] != "weights only":
        hess = imp.get("hessian_data") or {}
        factored = hess.get("layers_on_factored_hessians")
        lines.append(f"importance    {imp['criterion']} on {imp['data']}"
                     + (f"; {factored} of {hess['layers_scored']} layers scored on factored Hessians (wide convs; "
                        f"--exact-hessians for exact ones)" if factored else ""))
    for note in imp.get("notes", [])[:3]:
        lines.append(f"note          {note}")
    unfused = (rep.get("normalize") or {}).get("contrib_fusions_by_op")
    if unfused:
        ops = ", ".join(f"{op} x{n}" for op, n in unfused.items())
        lines.append(f"note          {sum(unfused.values())} onnxruntime contrib fusions ({ops}) written as the "
                     f"standard ops they fuse; onnxruntime's optimizers fuse them again")
    as_qdq = (rep.get("normalize") or {}).get("integer_kernels_as_qdq")
    if as_qdq:
        ops = ", ".join(f"{op} x{n}" for op, n in as_qdq.items())
        lines.append(f"note          {sum(as_qdq.values())} integer kernels ({ops}) were scored and refit in QDQ "
                     f"form (the same integers and scales): static ones stay QDQ, which onnxruntime fuses into its "
                     f"integer kernels; dynamic ones are written back as they came")
    if rep["unruled_ops"]:
        lines.append("no rule for    " + ", ".join(f"{k} x{n}" for k, n in rep["unruled_ops"].items()))
    for w in rep["warnings"][:5]:
        lines.append(f"warning       {w}")
    lines.append(f"time          {rep['timings_s']['total']:.2f} s")
    return "\n".join(lines)
