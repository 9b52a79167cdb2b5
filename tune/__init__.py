"""Ray Tune + Optuna orchestration of INR fits (imports Ray; the library under fewsound/ does not)."""
