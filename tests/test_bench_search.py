"""tools/bench_search.py: the bookkeeping (keys, resume, summaries, tables) on synthetic rows; no model runs."""
from __future__ import annotations

import json

import pytest

from tools import bench_search


def _row(policy, seed, acc, budget="flops0.1", evals=300, reward=0.5, model="resnet1d_mnist1d"):
    return {"model": model, "seed": seed, "budget": budget, "policy": policy, "evals": evals, "test_acc": acc,
            "reward": reward, "metrics": {"kl": 0.7}, "search_s": 10.0, "evaluations": evals if policy in
            ("random", *bench_search.AGENTS) else 1, "macs_ratio": 0.1, "latency_ms": 0.1, "load_search": [[1, 1, 1], [2, 1, 1]],
            "calib_fidelity_after": {"kl": 0.1}, "curve": [reward]}


def _results(tmp_path, rows, probes=()):
    res = bench_search.Results(tmp_path / "results.json", resume=False)
    res.runs.append({"command": "python tools/bench_search.py", "date": "d", "versions": "v", "cpus": 2,
                     "load": [1.0, 1.0, 1.0]})
    for r in rows:
        res.rows[bench_search.row_key(r)] = r
    for p in probes:
        res.probes[bench_search.probe_key(p)] = p
    return res


def test_budget_names_round_trip():
    b = bench_search.Budget("flops", 0.1)
    assert b.name == "flops0.1" and "90% removed" in b.label()
    assert bench_search._parse_name(b.name) == ("flops", 0.1, 1)
    assert bench_search._parse_name("latency0.5") == ("latency", 0.5, 1)
    lat = bench_search.Budget("latency", 0.5, 32)
    assert lat.name == "latency0.5b32" and bench_search.Budget(*bench_search._parse_name(lat.name)) == lat
    assert bench_search.budget_kwargs(lat, 10.0) == {"target_latency": 5.0, "latency_batch": 32, "threads": 2}
    assert sorted(["flops0.1", "latency0.5", "flops0.3"], key=bench_search._budget_order) == ["flops0.3", "flops0.1",
                                                                                      "latency0.5"]


def test_resume_keeps_rows_and_redoes_errors(tmp_path):
    rows = [_row("uniform", 0, 0.9), {**_row("dist", 0, None), "error": "boom"}]
    res = _results(tmp_path, rows)
    res.save()
    again = bench_search.Results(tmp_path / "results.json", resume=True)
    assert again.done(("resnet1d_mnist1d", 0, "flops0.1", "uniform", 300))
    assert not again.done(("resnet1d_mnist1d", 0, "flops0.1", "dist", 300))
    assert not bench_search.Results(tmp_path / "results.json", resume=False).rows
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"runs", "rows", "probes"}


def test_best_control_vs_best_rl(tmp_path):
    rows = [_row(p, s, acc) for s in (0, 1) for p, acc in
            (("uniform", 0.90), ("random", 0.92), ("dist", 0.935), ("sac", 0.5))]
    summ = bench_search.summarize(rows)
    assert summ[("resnet1d_mnist1d", "flops0.1", "random", 300)]["acc"] == pytest.approx(92.0)
    ctl = bench_search.best_of(summ, "resnet1d_mnist1d", "flops0.1", 300, bench_search.CONTROLS)
    rl = bench_search.best_of(summ, "resnet1d_mnist1d", "flops0.1", 300, bench_search.AGENTS)
    assert (ctl[0], rl[0]) == ("random", "dist")
    diff, std, n = bench_search.paired_diff(rl[1], ctl[1])
    assert diff == pytest.approx(1.5) and std == pytest.approx(0.0) and n == 2
    table = "\n".join(bench_search.comparison_table(summ))
    assert "random 92.00" in table and "dist 93.50" in table and "+1.50" in table and "| yes |" in table


def test_markdown_has_every_section(tmp_path):
    rows = [_row(p, 0, 0.8 + 0.01 * i, reward=0.1 * i) for i, p in enumerate(bench_search.POLICIES)]
    rows.append({"model": "resnet1d_mnist1d", "seed": 0, "budget": "none", "policy": "unpruned", "evals": 0,
                 "test_acc": 0.99, "macs_ratio": 1.0, "latency_ms": 0.2})
    probes = [{**_row("probe", 0, 0.5 + 0.1 * i, reward=0.1 * i - 0.3), "probe": i} for i in range(3)]
    md = bench_search.markdown(_results(tmp_path, rows, probes))
    assert "unpruned 99.00" in md and "FLOPs kept 0.1 (90% removed), 300 evaluations" in md
    assert "| ppo-gnn | 300 |" in md and "| uniform | 1 |" in md
    assert "Best control vs best RL policy" in md
    assert "| resnet1d_mnist1d | flops0.1 | 0 | 10 |" in md   # 3 probes + 7 chosen plans
    assert "+1.00" in md  # reward and accuracy rise together here


def test_fresh_cache_forgets_candidates_but_keeps_the_teacher():
    class Ev:
        cache, calls, measured, seconds, _teacher = {(1,): {}}, 3, 2, 1.5, ["t"]

    ev = Ev()
    bench_search.fresh_cache(ev)
    assert (ev.cache, ev.calls, ev.measured, ev.seconds, ev._teacher) == ({}, 0, 0, 0.0, ["t"])


def test_two_runs_into_one_folder_keep_each_others_rows(tmp_path):
    path = tmp_path / "results.json"
    first, second = bench_search.Results(path, resume=True), bench_search.Results(path, resume=True)
    first.add_row(_row("uniform", 0, 0.9))
    first.add_probe({**_row("probe", 0, 0.5), "probe": 0})
    first.save()
    second.add_row(_row("dist", 0, 0.8))
    second.add_row(_row("uniform", 0, 0.7))   # measured again by the second run: its own value wins
    second.save()
    again = bench_search.Results(path, resume=True)
    accs = {k[3]: r["test_acc"] for k, r in again.rows.items()}
    assert accs == {"uniform": 0.7, "dist": 0.8} and len(again.probes) == 1


def test_latency_note_reads_the_goal_from_the_round_robin_medians(tmp_path):
    """Right after the search one model was timed in a burst (+30 %); the passes' median puts it back in the band."""
    kw = {"target_latency": 20.0, "latency_batch": 32, "threads": 2}
    rows = [{**_row("uniform", 0, 0.9, budget="latency0.5b32"), "budget_kwargs": kw, "latency_ms": 19.0},
            {**_row("random", 0, 0.9, budget="latency0.5b32"), "budget_kwargs": kw, "latency_ms": 26.0}]
    res = _results(tmp_path, rows)
    note = "\n".join(bench_search.latency_note(res, "resnet1d_mnist1d", "latency0.5b32", 300))
    assert "right after its search: 1/2 within 10 % (uniform -5.0%, random +30.0%)" in note
    assert "round-robin" not in note  # not re-measured yet
    rows[0].update(latency_rounds_ms=[19.0, 25.0, 19.4], unpruned_rounds_ms=[40.0, 50.0, 41.0])
    rows[1].update(latency_rounds_ms=[21.0, 26.0, 20.6], unpruned_rounds_ms=[40.0, 50.0, 41.0])
    note = "\n".join(bench_search.latency_note(res, "resnet1d_mnist1d", "latency0.5b32", 300))
    assert "in 3 round-robin passes" in note and "medians 40.00-50.00 ms" in note
    assert "medians of 30 runs; the unpruned model's per-pass medians 40.00-50.00 ms): 2/2 within 10 % (uniform " \
           "-3.0%, random +5.0%)." in note
    # per pass / unpruned: uniform 0.475, 0.5, 0.473 -> 0.475 (-5 %); random 0.525, 0.52, 0.502 -> 0.52 (+4 %)
    assert "one median of the unpruned model taken before the searches (40.00 ms)" in note
    assert note.endswith("against 0.5: 2/2 within 10 % (uniform -5.0%, random +4.0%).")
    rows[0]["reference_ms"] = [39.0, 40.0, 41.0]
    note = "\n".join(bench_search.latency_note(res, "resnet1d_mnist1d", "latency0.5b32", 300))
    assert "0.5 x the median of 3 medians (39.00-41.00) of the unpruned model" in note
