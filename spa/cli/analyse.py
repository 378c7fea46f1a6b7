"""spa-prune analyse IN: a dry run listing coupled groups, MACs and every frozen group with why."""
from __future__ import annotations

import argparse

from .. import driver
from ..fileio import check_outputs
from .common import add_common, python_warnings, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyse", aliases=["analyze"], help="dry run: coupled groups, MACs, frozen channels",
                              description="Dry run: list every coupled group and every frozen group with why.")
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("--all", action="store_true", help="list every group (default: the 40 largest by MACs)")
    add_common(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    check_outputs({"--report": args.report}, driver.input_paths(args.input))
    model = driver.load(args.input, dict(args.input_shape))
    analysis = driver.analyse(model)
    groups = sorted(analysis.groups, key=lambda g: -g.macs)
    shown = groups if args.all else groups[:40]
    out = [f"{len(analysis.groups)} coupled groups, {analysis.total_macs:,} MACs, {len(analysis.ctx.sources)} prunable sources"]
    out.append(f"{'id':>4} {'units':>6} {'frozen':>6} {'MACs%':>7}  name")
    for g in shown:
        share = 100.0 * g.macs / max(analysis.total_macs, 1)
        out.append(f"{g.id:>4} {g.size:>6} {int(g.frozen.sum()):>6} {share:>7.2f}  {g.name}")
    if len(shown) < len(groups):
        out.append(f"... {len(groups) - len(shown)} more (use --all)")
    frozen = [g for g in analysis.groups if g.frozen.any()]
    if frozen:
        out.append(f"frozen ({len(frozen)} groups):")
        for g in frozen:
            for where, why in g.reasons[:3]:
                out.append(f"  group {g.id} '{g.name}': {where}: {why}")
    print("\n".join(out))
    if args.report:
        write_json({"total_macs": analysis.total_macs, "groups": [g.to_json() for g in analysis.groups],
                    "unruled_ops": analysis.unruled_ops,
                    "warnings": [*model.warnings, *python_warnings(args)]}, args.report)
    return 0
