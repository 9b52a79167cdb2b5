"""A sweep of thousands of fits in MLflow's own UI, in a real headless Chromium: how long until a user sees it.

    python benchmarks/mlflow_ui.py --home /work/bench/home10k --experiment scale-10000   # a sweep's home
    python benchmarks/mlflow_ui.py --uri http://127.0.0.1:5000 --experiment fit_inrs    # a running server
    python benchmarks/mlflow_ui.py --runs 1000                                           # its own experiment

Given a FEWSOUND_HOME (its MLflow server is started, or reused while it runs) or a tracking URI, and an experiment
holding a sweep (its newest parent run, fewsound.role = parent), it opens four pages of MLflow's UI, each in a
fresh Chromium (nothing cached: what a first visit costs) and then once more in the same browser (cached):
  fits          the experiment's runs page as MLflow opens it: time until its run rows are rendered
  summaries     the summary experiment ("<experiment> summary", tune.sweep.summary: one run per table row with
                the row's mean, std and 95% interval over clips per metric): time until every summary run's row
                is visible; sorted by the headline metric's mean, best first
  compare       MLflow's comparison of the summary runs (every row's mean, std, 95% interval per metric side by
                side; the link the sweep prints): time until every row and the headline metric's statistics show
  best row run  the best summary run's own page: time until its description shows the row's best fits (ranked
                by the sweep from the rows in hand, tune.sweep.summary_runs)
  best fits     the experiment's runs page sorted by the headline metric (eval/pesq, else eval/si_snr, eval/psnr,
                ...), best first: time until its first rows are the best fits (as MlflowClient orders them)
Times are milliseconds from the navigation's start (the page's performance.now()) until the rows are in the
DOM; the goal is under 3 s for the fits page. A sweep logged before summary runs existed gets them first (its rows
read back from MLflow with tune.report.collect, the table built and logged by tune.sweep.summary, as a sweep
does at its end: --no-summarize leaves such a sweep without them and skips that page).

--runs N makes its own experiment on a throw-away home first: a parent run, N child fits (4 configurations,
metrics eval/mse, eval/psnr, eval/pesq, logged through MlflowClient like a sweep's records), and their summary
runs. Results: benchmarks/results/mlflow_ui_<N>.json (N: the fits the sweep's parent has).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/browser.py: Chromium over the DevTools protocol
RESULTS = ROOT / "benchmarks" / "results"
GOAL_S = 3.0
VIEWPORT = {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
LABELS = ["NERF", "SIREN", "KAN", "RFF"]

# Polls the page until `ready(rows, text)` holds: `rows` the runs table's row texts in display order (ag-grid: a
# row's cells may sit in several containers, each element carrying the row's row-index), `text` the page's text;
# returns when, and the first rows.
POLL_JS = """
(async () => {
  const ready = %(ready)s;
  const rows = () => {
    const m = new Map();
    for (const el of document.querySelectorAll('.ag-row[row-index]')) {
      const i = +el.getAttribute('row-index');
      m.set(i, (m.get(i) || '') + ' ' + el.innerText.replace(/\\s+/g, ' '));
    }
    return [...m.entries()].sort((a, b) => a[0] - b[0]).map(e => e[1].trim());
  };
  const deadline = performance.now() + %(timeout_ms)d;
  while (performance.now() < deadline) {
    const r = rows(), text = document.body ? document.body.innerText : '';
    if (ready(r, text)) return {ms: performance.now(), n_rows: r.length, first_rows: r.slice(0, 8)};
    await new Promise(res => setTimeout(res, 25));
  }
  const r = rows();
  return {ms: null, n_rows: r.length, first_rows: r.slice(0, 8), body: document.body.innerText.slice(0, 500)};
})()
"""


def open_and_wait(browser: Any, url: str, ready_js: str, timeout_s: float, screenshot: Path | None) -> dict:
    """Open `url` in a new tab of `browser` (tests/browser.py's Chromium) at VIEWPORT and poll until `ready_js`
    (a JS function of the rows' texts) holds: {ms from the navigation's start or None, n_rows, first_rows}."""
    import base64

    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.send("Emulation.setDeviceMetricsOverride", VIEWPORT, session=session)
    browser.send("Page.enable", session=session)
    browser.send("Page.navigate", {"url": url}, session=session)
    base = url.split("#")[0]
    for _ in range(100):  # the first evaluation may land on about:blank before the navigation commits
        href = browser.send("Runtime.evaluate", {"expression": "location.href", "returnByValue": True}, session)
        if str(href["result"].get("value", "")).startswith(base):
            break
        time.sleep(0.05)
    expression = POLL_JS % {"ready": ready_js, "timeout_ms": int(timeout_s * 1000)}
    out = browser.send(
        "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, session=session
    )
    if "exceptionDetails" in out:
        raise RuntimeError(f"JS error on {url}: {out['exceptionDetails']}")
    result = out["result"]["value"]
    if screenshot is not None:
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    browser.send("Target.closeTarget", {"targetId": target})
    result["ms"] = None if result["ms"] is None else round(result["ms"])
    return result


def measure_page(url: str, ready_js: str, timeout_s: float, shots: Path | None, name: str) -> dict:
    """The page's first visit in a fresh Chromium (an empty profile) and a second visit in the same browser."""
    from browser import Chromium

    with Chromium(timeout=timeout_s + 30) as browser:
        cold = open_and_wait(browser, url, ready_js, timeout_s, shots / f"{name}.png" if shots else None)
        warm = open_and_wait(browser, url, ready_js, timeout_s, None)
    return {"url": url, "first_visit": cold, "cached": warm}


def ready_names(names: list[str]) -> str:
    """A JS test: the first len(names) rows carry these run names, in this order."""
    return "r => r.length > 0 && %s.every((n, i) => r[i] !== undefined && r[i].includes(n))" % json.dumps(names)


# --- the sweep in MLflow --------------------------------------------------------------------------------------


def find_sweep(client: Any, experiment: str) -> tuple[Any, Any]:
    """(the experiment, its newest sweep parent run); one line and exit when either is missing."""
    from tune.spine import ROLE_TAG, tag_filter

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"--experiment {experiment!r}: no such experiment at {client.tracking_uri}")
    parents = client.search_runs(
        [exp.experiment_id], tag_filter(ROLE_TAG, "parent"), order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        raise SystemExit(f"--experiment {experiment!r}: no sweep parent run (tag fewsound.role = parent)")
    return exp, parents[0]


def summary_runs(client: Any, uri: str, exp: Any, parent: Any, summarize: bool) -> tuple[Any, list[Any], float]:
    """(the summary experiment, the parent's summary runs, seconds spent logging them). A sweep without summary
    runs gets them (summarize) from its rows read back from MLflow, exactly as a sweep logs them at its end."""
    from fewsound import tables
    from fewsound.tracking import MlflowRun
    from tune.report import collect
    from tune.spine import SUMMARY_ROLE, SWEEP_PARENT_TAG, SWEEP_TAG, search_runs, tag_filter
    from tune.sweep.result import SweepSummary
    from tune.sweep.summary_runs import log_summary_runs, summary_experiment

    def found() -> tuple[Any, list[Any]]:
        sexp = client.get_experiment_by_name(summary_experiment(exp.name))
        if sexp is None:
            return None, []
        where = f"{tag_filter(SWEEP_PARENT_TAG, parent.info.run_id)} and tags.`fewsound.role` = '{SUMMARY_ROLE}'"
        return sexp, search_runs(client, sexp.experiment_id, where)

    sexp, runs = found()
    if runs or not summarize:
        return sexp, runs, 0.0
    t = time.perf_counter()
    _, rows = collect(uri, parent.info.run_id)
    s = SweepSummary(parent.data.tags.get(SWEEP_TAG, parent.info.run_name), exp.name, parent.info.run_id, uri,
                     len(rows), 0, len(rows), 0, 0.0, {}, rows, experiment_id=exp.experiment_id)  # fmt: skip
    run = MlflowRun(exp.name, uri=uri, run_id=parent.info.run_id)
    log_summary_runs(run, s, tables.build_table(rows, title="summary"))
    seconds = time.perf_counter() - t
    sexp, runs = found()
    return sexp, runs, seconds


def make_experiment(client: Any, uri: str, n: int) -> str:
    """An experiment "ui-bench-N": a sweep parent with N FINISHED child fits (len(LABELS) configurations, clips
    rotating) and their summary runs. Returns its name."""
    import numpy as np

    from fewsound import tables
    from fewsound.tracking import PARENT_TAG, MlflowRun, log_run
    from tune.spine import FAMILY_TAG, FIT_KEY_TAG, JOB_TAG, LABEL_TAG, N_FITS_TAG, ROLE_TAG, SWEEP_TAG
    from tune.sweep.result import SweepSummary
    from tune.sweep.summary_runs import log_summary_runs

    name, sid = f"ui-bench-{n}", f"ui-bench-{n}"
    parent = MlflowRun(name, uri=uri, run_name=sid, tags={ROLE_TAG: "parent", SWEEP_TAG: sid, JOB_TAG: "fit_inrs",
                                                          N_FITS_TAG: n})  # fmt: skip
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        quality = LABELS.index(label) / len(LABELS)  # configurations differ: the sort has a best one
        metrics = {
            "eval/mse": float(rng.lognormal(-6 - quality, 0.3)),
            "eval/psnr": float(30 + 8 * quality + rng.normal(0, 2)),
            "eval/pesq": float(np.clip(1.5 + 2 * quality + rng.normal(0, 0.4), 1, 4.5)),
        }
        rows.append({"key": f"{label.lower()}-clip{i // len(LABELS):05d}-bench", "label": label,
                     "family": label.lower(), "clip_id": f"clip{i // len(LABELS):05d}", "length": 32_768,
                     "kind": "speech", **metrics, "model/params": 10_000 * (1 + LABELS.index(label))})  # fmt: skip

    def log(r: dict[str, Any]) -> str:
        tags = {PARENT_TAG: parent.run_id, FIT_KEY_TAG: r["key"], SWEEP_TAG: sid, FAMILY_TAG: r["family"],
                LABEL_TAG: r["label"]}  # fmt: skip
        params = {"family": r["family"], "clip_id": r["clip_id"], "clip.length": r["length"], "clip.kind": "speech"}
        metrics = {k: v for k, v in r.items() if "/" in k}
        return log_run(client, parent.experiment_id, run_name=r["key"], tags=tags, params=params, metrics=metrics)

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for r, run_id in zip(rows, pool.map(log, rows)):
            r["run_id"] = run_id
    print(f"logged {n} child runs in {time.perf_counter() - t:.0f} s", flush=True)
    s = SweepSummary(sid, name, parent.run_id, uri, n, 0, n, 0, 0.0, {}, rows, experiment_id=parent.experiment_id)
    log_summary_runs(parent, s, tables.build_table(rows, title="summary"))
    parent.end()
    return name


def best_fits(client: Any, exp_id: str, metric: str, k: int = 3) -> list[str]:
    """Names of the experiment's k best runs by `metric` in the direction the paper's tables use."""
    from fewsound.tables import COLUMNS

    lower = any(key == metric and better == "lower" for _, key, better in COLUMNS)
    order = [f"metrics.`{metric}` {'ASC' if lower else 'DESC'}"]
    return [r.info.run_name for r in client.search_runs([exp_id], order_by=order, max_results=k)]


def measure(uri: str, experiment: str, args: argparse.Namespace) -> dict:
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import PARENT_TAG, ui_url
    from tune.spine import NOTE_TAG, tag_filter
    from tune.sweep.result import SweepSummary
    from tune.sweep.summary_runs import headline_metric, runs_page_url

    client = MlflowClient(tracking_uri=uri)
    exp, parent = find_sweep(client, experiment)
    sexp, summaries, summarize_s = summary_runs(client, uri, exp, parent, not args.no_summarize)
    n_fits = int(parent.data.metrics.get("sweep/fits", parent.data.tags.get("fewsound.n_fits", 0)))
    a_fit = client.search_runs([exp.experiment_id], f"{tag_filter(PARENT_TAG, parent.info.run_id)}", max_results=1)
    metric = args.metric or headline_metric([r.data.metrics for r in a_fit])
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    pages: dict[str, Any] = {}
    fits_url = ui_url(uri, exp.experiment_id)
    pages["fits"] = measure_page(fits_url, "r => r.length > 0", args.timeout, shots, "fits")
    pages["fits"]["runs_on_the_page"] = "first rows only: the table loads 100 runs a page"
    if summaries and metric:
        names = [r.info.run_name for r in summaries]
        best = best_fits(client, sexp.experiment_id, f"{metric}/mean", k=1)
        ready = f"r => ({ready_names(best)})(r) && {json.dumps(names)}.every(n => r.some(x => x.includes(n)))"
        url = runs_page_url(ui_url(uri, sexp.experiment_id), "", f"{metric}/mean")
        pages["summaries"] = measure_page(url, ready, args.timeout, shots, "summaries")
        pages["summaries"].update(summary_runs=len(names), best_first=best[0])
        compare = SweepSummary("", exp.name, parent.info.run_id, uri, 0, 0, 0, 0, 0.0, {}, [],
                               summary_runs={n: r.info.run_id for n, r in zip(names, summaries)},
                               summary_experiment_id=sexp.experiment_id)  # fmt: skip
        stats = [f"{metric}/{k}" for k in ("mean", "std", "ci95_low", "ci95_high")]
        ready = f"(r, text) => {json.dumps(names + stats)}.every(n => text.includes(n))"
        pages["compare"] = measure_page(compare.compare_ui_url(), ready, args.timeout, shots, "compare")
        top = next(r for r in summaries if r.info.run_name == best[0])
        listed = re.search(r"^1\. \[([^\]]+)\]", top.data.tags.get(NOTE_TAG, ""), re.M)
        if listed:  # the best row's run page: its description lists the row's best fits
            ready = f"(r, text) => text.includes({json.dumps(listed.group(1))})"
            url = ui_url(uri, sexp.experiment_id, top.info.run_id)
            pages["best_row_run"] = measure_page(url, ready, args.timeout, shots, "best_row_run")
            pages["best_row_run"].update(best_fit_listed=listed.group(1))
    if metric:
        best = best_fits(client, exp.experiment_id, metric)
        url = runs_page_url(fits_url, "", metric)
        pages["best_fits"] = measure_page(url, ready_names(best), args.timeout, shots, "best_fits")
        pages["best_fits"].update(metric=metric, best=best)
    ok = {k: p["first_visit"]["ms"] is not None for k, p in pages.items()}
    return {
        "tracking_uri": uri,
        "experiment": experiment,
        "fits": n_fits,
        "runs_in_experiment": _count(client, exp.experiment_id),
        "summary_experiment": sexp.name if sexp else None,
        "summary_runs": len(summaries),
        "summary_runs_logged_here_s": round(summarize_s, 2),
        "headline_metric": metric,
        "pages": pages,
        "goal_s": GOAL_S,
        "fits_page_under_goal": bool(ok["fits"] and pages["fits"]["first_visit"]["ms"] < 1000 * GOAL_S),
        "every_page_ready": all(ok.values()),
    }


def _count(client: Any, exp_id: str) -> int:
    from tune.spine import search_runs

    return len(search_runs(client, exp_id))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--home", default=None, help="a FEWSOUND_HOME: its MLflow server is started or reused")
    where.add_argument("--uri", default=None, help="a running MLflow server's URI")
    p.add_argument("--experiment", default=None, help="the sweep's experiment (with --home / --uri)")
    p.add_argument("--runs", type=int, default=None, help="make an experiment of N child fits on a throw-away home")
    p.add_argument("--metric", default=None, help="the metric to sort by (default: eval/pesq, else the first)")
    p.add_argument("--no-summarize", action="store_true", help="do not log summary runs a sweep lacks")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each page (default: 60)")
    p.add_argument("--screenshots", default=None, help="a folder for a screenshot of each page")
    p.add_argument("--out", default=None, help="results file (default: results/mlflow_ui_<N>.json)")
    args = p.parse_args()
    if args.runs is None and args.experiment is None:
        p.error("give --experiment (with --home or --uri), or --runs N")
    from fewsound import tracking

    tmp = None
    if args.uri:
        uri = args.uri
    else:
        home = Path(args.home) if args.home else Path(tmp := tempfile.mkdtemp(prefix="fewsound-ui-"))
        uri = tracking.start_local_server(home=home)
    try:
        experiment = args.experiment
        if args.runs is not None:
            from mlflow.tracking import MlflowClient

            experiment = make_experiment(MlflowClient(tracking_uri=uri), uri, args.runs)
        assert experiment is not None
        load_before = os.getloadavg()
        result = measure(uri, experiment, args)
    finally:
        if tmp:
            tracking.stop_local_server(Path(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
    out = {"machine": {"cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before]}, **result}
    path = Path(args.out or RESULTS / f"mlflow_ui_{result['fits']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, page in result["pages"].items():
        cold, warm = page["first_visit"], page["cached"]
        print(f"{name:10} first visit {cold['ms']} ms, cached {warm['ms']} ms  ({cold['n_rows']} rows rendered)")
    print(f"fits page under {GOAL_S:.0f} s: {result['fits_page_under_goal']}; every page ready: "
          f"{result['every_page_ready']}; wrote {path}")  # fmt: skip
    return 0 if result["every_page_ready"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
