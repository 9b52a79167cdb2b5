"""What every Ray worker process of a fewsound job runs first: the job's `worker_process_setup_hook` (Ray's
documented runtime_env field), which `tune.ray_env.init_ray` sets to WORKER_SETUP_HOOK. Standard library only:
every worker of the job imports this module before it runs anything, so its import must cost nothing."""

from __future__ import annotations

import sys

WORKER_SETUP_HOOK = "tune.worker_setup.quiet_exits"  # a module path: Ray imports it in each worker


def quiet_exits() -> None:
    """Ray ends an actor (a trial's, a training worker's) with SIGTERM, whose handler raises SystemExit wherever the
    worker happens to be. Landing in a finalizer (a WeakSet callback of a finished thread), Python prints it as
    "Exception ignored in ... SystemExit" with a traceback, into the job's output. The process is exiting anyway:
    such exits are not printed (sys.unraisablehook); every other unraisable exception still is. Idempotent.

    Run from a worker's start (the setup hook), it also covers an actor ended before its trainable ran; trials call
    it again for a Ray that was started without the hook (by a user's own `ray.init`)."""
    if getattr(sys.unraisablehook, "fewsound_quiet_exits", False):
        return
    default = sys.unraisablehook

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if not isinstance(unraisable.exc_value, (SystemExit, KeyboardInterrupt)):
            default(unraisable)

    hook.fewsound_quiet_exits = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
