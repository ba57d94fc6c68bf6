"""`fusion-report`: a self-contained HTML page of a training run (`fusion_train.monitor.report`),
of a sweep (`--sweep`: the stability lab, `fusion_train.lab.report`), or the dense-against-untied
comparison of an untied sweep (`--untied`: `fusion_train.lab.untied`, a table and a plot), or the
router-collapse calibration of a sweep of experts (`--routers`: `fusion_train.lab.routers`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fusion_train.lab.report import SweepReportError, write_sweep_report
from fusion_train.lab.routers import RouterReportError, write_router_report
from fusion_train.lab.untied import write_untied_report
from fusion_train.monitor.report import ReportError, write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the training run's folder (trainer.run_dir), or a sweep's")
    parser.add_argument("--out", type=Path, help="where to write the page and the PNGs (default: RUN_DIR/report)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--sweep", action="store_true", help="RUN_DIR is a sweep's folder (fusion-train -m)")
    kind.add_argument("--untied", action="store_true", help="RUN_DIR is an untied sweep's (+experiment=untied): "
                      "untied.md (printed) and untied.png")  # fmt: skip
    kind.add_argument("--routers", action="store_true", help="RUN_DIR is a sweep of experts "
                      "(+experiment=router_collapse): routers.md (printed) and routers.png")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.untied or args.routers:
            _, table = (write_untied_report if args.untied else write_router_report)(args.run_dir, args.out)
            sys.stdout.write(table)
            return 0
        page = write_sweep_report(args.run_dir, args.out) if args.sweep else write_report(args.run_dir, args.out)
    except (ReportError, SweepReportError, RouterReportError) as error:
        print(f"fusion-report: error: {error}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
