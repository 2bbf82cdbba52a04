"""``python -m sd_dmd.report RUN_DIR``: a run's curves (curves.png) and a health report from its logged history; the
code is in :mod:`sd_dmd.outputs.report`, the rules and their measured thresholds in docs/HEALTH.md."""
from sd_dmd.outputs.report import main

if __name__ == "__main__":
    raise SystemExit(main())
