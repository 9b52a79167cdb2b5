"""Sweeps of single-clip INR fits: one MLflow parent run, Ray Tune trials of packed fits, idempotent resume.

driver.py    run_sweep: open or reopen the parent, plan for the cluster, run the packs in Tune, summarize
plan.py      what a sweep asks Ray for (trial resources, slots at the cluster's ceiling) and its argument checks
progress.py  Tune callbacks: a line per finished pack (done / failed / remaining / ETA), the tracking server watched
summary.py   what the sweep reports: the per-fit rows, failed fits, the parent's tables and plots
summary_runs.py  one summary run per table row (mean, 95% interval per metric) and the sweep's links into MLflow's UI
trial.py     what one Tune trial does: fit its packs, evaluate them (overlapped with the next fit on a GPU)
context.py   what every trial is handed (TrialContext), the corpus and tracking client it opens once
record.py    each fit's record in the sweep's storage, then its child run (the target once per clip)
durable.py   records replayed into MLflow child runs (idempotent); the tracking server watched
"""

from tune.sweep.driver import SweepSummary, run_sweep, sweep_id

__all__ = ["SweepSummary", "run_sweep", "sweep_id"]
