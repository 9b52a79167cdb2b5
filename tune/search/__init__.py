"""Hyper-parameter search of INR families under a parameter budget (Optuna TPE through Ray Tune, with ASHA).

driver.py   run_search: open/reopen the parent, the study, the Tune run, stop on a signal, the summary
trial.py    one trial: a configuration fitted on the search's clips, scored after every chunk, one child run
study.py    the Optuna study stored as a journal (resumable), the searcher and the scheduler Tune drives
results.py  what a search is (SearchContext) and what it found (SearchSummary, the comparison table)
progress.py what it prints: its first line and one line per ended trial
heldout.py  the winner and the start points refitted on held-out clips, with intervals and a paired test
report.py   what the parent run gets: comparison, every trial as CSV, importances, plots, listening page
"""

from tune.search.driver import run_search
from tune.search.results import SearchContext, SearchSpec, SearchSummary, comparison_markdown

__all__ = ["SearchContext", "SearchSpec", "SearchSummary", "comparison_markdown", "run_search"]
