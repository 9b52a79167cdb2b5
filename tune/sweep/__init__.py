"""Sweeps of single-clip INR fits: one MLflow parent run, Ray Tune trials of packed fits, idempotent resume.

driver.py    run_sweep: open or reopen the parent, plan for the cluster, run the packs in Tune, summarize
plan.py      what a sweep asks Ray for (trial resources, slots at the cluster's ceiling) and its argument checks
progress.py  Tune callbacks: a line per finished pack (done / failed / remaining / ETA), the tracking server watched
summary.py   what the sweep reports: the per-fit rows, failed fits, the parent's tables and plots
(trial.py, durable.py and report.py, one level up, are what a trial does, the records' replay and the reports)
"""

from tune.sweep.driver import SweepSummary, run_sweep, sweep_id

__all__ = ["SweepSummary", "run_sweep", "sweep_id"]
