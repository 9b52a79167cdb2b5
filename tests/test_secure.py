"""Secure by default on a shared cluster (issue 26): no code runs from a checkpoint, and the cluster's MLflow server
wants a login and answers only its own addresses.

- A training checkpoint, a packed fit's checkpoint or a FewSound model file that someone replaced with one carrying
  a pickled object (whose unpickling would run code) is refused by resuming, by model loading and by
  `jobs/evaluate_fewsound.py --model FOLDER`, with one line naming the file (never torch's advice to load it with
  weights_only=False), and the code never runs (a marker file it would create never appears).
- The MLflow server started with cluster.yaml's own command line (`python -m fewsound mlflow serve ...`, only the
  paths, the bucket and the port swapped for local ones) with the secret files of `python -m fewsound mlflow
  secrets` placed where cluster.yaml's file_mounts put them: 401 without the login, 403 for a Host header that is
  not the head's address or localhost, and a real job (`jobs/fit_inrs.py --smoke-test`) whose MLflow client reads
  the login from ~/.mlflow/credentials logs its runs.
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from support import REPO, free_port, kill_tree  # tests/support.py

from fewsound import tracking
from fewsound.errors import ConfigError
from fewsound.hyper import HyperConfig, build_model
from fewsound.mlflow_server import CREDENTIALS_FILE, FLASK_SECRET_FILE, make_secrets, read_credentials
from fewsound.train import (
    META_FILE,
    STATE_FILE,
    STATE_FORMAT,
    TrainConfig,
    load_training_state,
    make_optimizer,
    model_from_training_state,
    save_training_state,
    state_digest,
    train_step,
)

CLUSTER_YAML = REPO / "cluster.yaml"
HEAD_IP = "10.0.1.5"  # stands for the head's private address (`hostname -I` in cluster.yaml's line)


class _RunsCode:
    """Pickles to a call of exec: loading it with the full unpickler runs `code`."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _tiny() -> TrainConfig:
    return TrainConfig(model=HyperConfig(target="kan", preset="tiny", clip_length=4096), epochs=4, batch_size=2)


def _checkpoint(folder: Path) -> tuple[TrainConfig, dict]:
    """A real checkpoint after one optimizer step (non-trivial AdamW moments and schedule)."""
    cfg = _tiny()
    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    batch = torch.sin(torch.linspace(0, 300, 4096)).repeat(2, 1) * torch.tensor([[0.5], [0.2]])
    train_step(model, batch, optimizer, scheduler=scheduler)
    return cfg, save_training_state(folder, model, optimizer, scheduler, cfg, epoch=0, step=1)


def _plant(folder: Path, marker: Path) -> None:
    """Replace folder's train_state.pt by the same state plus an object that creates `marker` when unpickled."""
    payload = torch.load(folder / STATE_FILE, weights_only=True)
    payload["scheduler"]["_anneal_func_type"] = _RunsCode(f"open({str(marker)!r}, 'w').write('pwned')")
    torch.save(payload, folder / STATE_FILE)


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path, processes):
    folder = tmp_path / "epoch_00001"
    cfg, _ = _checkpoint(folder)
    # the planted file is real: the full unpickler (what resuming used before) runs its code
    control = tmp_path / "control"
    shutil.copytree(folder, control)
    _plant(control, tmp_path / "ran-under-full-unpickler")
    torch.load(control / STATE_FILE, weights_only=False)
    assert (tmp_path / "ran-under-full-unpickler").read_text() == "pwned"

    marker = tmp_path / "ran"
    _plant(folder, marker)
    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    with pytest.raises(ConfigError) as resumed:
        load_training_state(folder, model, optimizer, scheduler)  # what every Ray Train worker calls on resume
    with pytest.raises(ConfigError) as evaluated:
        model_from_training_state(folder)
    for e in (resumed.value, evaluated.value):
        msg = str(e)
        assert "\n" not in msg and msg.startswith(f"{folder / STATE_FILE}: refused")
        assert "a pickled Python object (exec)" in msg and "could run code" in msg
    assert not marker.exists()

    # the laptop side: evaluating the checkpoint folder (a bucket's copy) prints one line and exits non-zero
    proc = processes.run(
        [sys.executable, "jobs/evaluate_fewsound.py", "--model", str(folder), "--no-mlflow", "--smoke-test"],
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {resumed.value}"
    assert not marker.exists()


def _planted_refusal(path: Path, load, marker: Path) -> str:
    """Plant an object that creates `marker` when unpickled into the dict saved at `path`, show the full unpickler
    would run it, then call `load()`: it must raise a one-line ConfigError naming `path`, and run nothing."""
    payload = torch.load(path, weights_only=True)
    control = marker.with_name(marker.name + "-control")
    payload["planted"] = _RunsCode(f"open({str(control)!r}, 'w').write('pwned')")
    torch.save(payload, control.with_suffix(".pt"))
    torch.load(control.with_suffix(".pt"), weights_only=False)
    assert control.read_text() == "pwned"  # the planted object is real: the full unpickler runs its code
    payload["planted"] = _RunsCode(f"open({str(marker)!r}, 'w').write('pwned')")
    torch.save(payload, path)
    with pytest.raises(ConfigError) as e:
        load()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: refused: it holds a pickled Python object (exec)"), msg
    assert "could run code" in msg and "weights_only=False" not in msg  # never torch's advice to load it unsafely
    assert not marker.exists()
    return msg


def test_a_fit_checkpoint_or_model_file_carrying_code_is_refused_and_runs_nothing(tmp_path, speech_clips):
    """The other two files fewsound writes with torch.save: a packed fit's checkpoint (what a sweep's trial resumes
    from, in the shared storage) and a FewSound model file (what evaluate/reconstruct --model read)."""
    from fewsound.fit import CHECKPOINT_NAME, FitConfig, fit
    from fewsound.hyper import load_model, save_model

    x = speech_clips[0].load(sr=22_050)[4096 : 4096 + 2048]
    cfg = FitConfig(family="kan", steps=2, checkpoint_every=1)
    fit(cfg, x, checkpoint_dir=tmp_path / "fit")
    msg = _planted_refusal(
        tmp_path / "fit" / CHECKPOINT_NAME, lambda: fit(cfg, x, checkpoint_dir=tmp_path / "fit"), tmp_path / "ran"
    )
    assert "fit checkpoints hold only tensors and plain data" in msg
    (tmp_path / "fit" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint at all")  # garbage is no pickled object
    with pytest.raises(ConfigError) as e:
        fit(cfg, x, checkpoint_dir=tmp_path / "fit")
    garbage = str(e.value)
    assert (
        garbage.startswith(f"{tmp_path / 'fit' / CHECKPOINT_NAME}: unreadable fit checkpoint (") and "\n" not in garbage
    )

    model_file = save_model(tmp_path / "model.pt", build_model(_tiny().model, verbose=False))
    assert load_model(model_file).config == _tiny().model  # the file as written loads
    msg = _planted_refusal(model_file, lambda: load_model(model_file), tmp_path / "ran-model")
    assert "model files hold only tensors and plain data" in msg


def test_checkpoints_are_plain_data_and_round_trip_exactly(tmp_path):
    """Written and read weights-only; the restored model, AdamW state, schedule and counters are the saved ones.
    A checkpoint of the release before this change (no format tag) still loads; a truncated one is refused."""
    cfg, meta = _checkpoint(tmp_path / "new")
    payload = torch.load(tmp_path / "new" / STATE_FILE, weights_only=True)  # plain torch, weights-only: no error
    assert payload["format"] == STATE_FORMAT and (payload["epoch"], payload["step"]) == (0, 1)
    assert payload["optimizer"]["state"] and isinstance(payload["optimizer"]["param_groups"][0]["betas"], tuple)

    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    assert state_digest(model, optimizer, scheduler) != meta["digest"]
    loaded = load_training_state(tmp_path / "new", model, optimizer, scheduler)
    assert loaded["digest_loaded"] == meta["digest"] and (loaded["epoch"], loaded["step"]) == (0, 1)
    assert scheduler.state_dict()["last_epoch"] == 1 and optimizer.state_dict()["state"][0]["step"] == 1

    old = tmp_path / "old"  # the previous release's file: the same payload without the format tag
    old.mkdir()
    del payload["format"]
    torch.save(payload, old / STATE_FILE)
    shutil.copy(tmp_path / "new" / META_FILE, old / META_FILE)
    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    assert load_training_state(old, model, optimizer, scheduler)["digest_loaded"] == meta["digest"]

    data = (old / STATE_FILE).read_bytes()
    (old / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="unreadable training checkpoint") as e:
        model_from_training_state(old)
    assert "\n" not in str(e.value) and str(old / STATE_FILE) in str(e.value)


def test_secrets_command_makes_private_random_files_and_keeps_existing_ones(tmp_path, processes):
    laptop, other = tmp_path / "cluster", tmp_path / "other"
    run = [sys.executable, "-m", "fewsound", "mlflow", "secrets", "--dir", str(laptop)]
    elsewhere = processes.start([*run[:-1], str(other)], cwd=REPO)  # another folder, meanwhile: its own secrets
    out = processes.run(run, cwd=REPO, timeout=120, check=True).stdout
    assert f"wrote {laptop / CREDENTIALS_FILE}" in out and f"wrote {laptop / FLASK_SECRET_FILE}" in out
    assert stat.S_IMODE(laptop.stat().st_mode) == 0o700
    for name in (CREDENTIALS_FILE, FLASK_SECRET_FILE):
        assert stat.S_IMODE((laptop / name).stat().st_mode) == 0o600
    user, word = read_credentials(laptop / CREDENTIALS_FILE)
    assert user == "admin" and len(word) >= 40
    before = {n: (laptop / n).read_text() for n in (CREDENTIALS_FILE, FLASK_SECRET_FILE)}
    again = processes.run(run, cwd=REPO, timeout=120, check=True).stdout
    assert "kept" in again and {n: (laptop / n).read_text() for n in before} == before
    assert elsewhere.wait(timeout=120) == 0
    assert read_credentials(other / CREDENTIALS_FILE)[1] != word  # random, not a fixed default


def test_serve_with_logins_needs_the_secret_files(tmp_path):
    from fewsound.mlflow_server import serve

    base = dict(artifacts=str(tmp_path / "a"), app_name="basic-auth")
    with pytest.raises(ConfigError, match="needs --credentials and --flask-secret"):
        serve(str(tmp_path / "m.db"), **base)
    (tmp_path / "key").write_text("k" * 43)
    with pytest.raises(ConfigError, match="mlflow secrets") as e:
        serve(str(tmp_path / "m.db"), credentials=tmp_path / "none", flask_secret=tmp_path / "key", **base)
    assert str(tmp_path / "none") in str(e.value)


# --------------------------------------------------------------------------------------------- the cluster server


def _cluster_serve_command(config: dict) -> tuple[list[str], dict[str, str]]:
    """cluster.yaml's server line as argv (before its options) and {option: value}, the head's address as HEAD_IP."""
    (line,) = [c for c in config["head_start_ray_commands"] if "fewsound mlflow serve" in c]
    line = line.replace("$(hostname -I | awk '{print $1}')", HEAD_IP)
    start = line.index("python -m fewsound mlflow serve")
    words = shlex.split(line[start : line.index(" > ", start)])  # up to its log's redirection
    head, rest = words[:5], words[5:]
    assert head == ["python", "-m", "fewsound", "mlflow", "serve"] and len(rest) % 2 == 0, words
    options = dict(zip(rest[::2], rest[1::2]))
    assert all(k.startswith("--") for k in options), options
    return head, options


def _request(url: str, *, login: tuple[str, str] | None = None, host: str | None = None) -> int:
    req = urllib.request.Request(url)
    if login:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.integration
def test_the_cluster_server_wants_a_login_answers_only_its_hosts_and_a_job_logs_with_the_files(tmp_path):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    _, options = _cluster_serve_command(config)
    # the secret files: made on the laptop, then placed on the "node" where cluster.yaml's file_mounts put them
    laptop, node = tmp_path / "laptop" / ".fewsound" / "cluster", tmp_path / "node"
    make_secrets(laptop)  # what `python -m fewsound mlflow secrets --dir LAPTOP` runs (its command: test above)
    for remote, local in config["file_mounts"].items():
        if local.startswith("~/.fewsound/cluster/"):
            dest = node / Path(remote).relative_to("/home/ray")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(laptop / Path(local).name, dest)
    login = read_credentials(node / ".mlflow" / "credentials")

    port = free_port()
    local = {  # only where things are: the same options, with cluster.yaml's own values for the rest
        "--store": str(node / "mlflow" / "mlflow.db"),
        "--backup": str(tmp_path / "bucket" / "mlflow.db"),
        "--artifacts": str(tmp_path / "bucket" / "mlflow-artifacts"),
        "--host": "127.0.0.1",
        "--port": str(port),
        "--credentials": str(node / Path(options["--credentials"]).relative_to("/home/ray")),
        "--flask-secret": str(node / Path(options["--flask-secret"]).relative_to("/home/ray")),
        "--workers": "1",  # the head's count is sized for its 8 vCPUs; one is enough for this test on CI's 2
    }
    assert set(options) == set(local) | {"--app-name", "--allowed-hosts"}, "a new option in cluster.yaml's line"
    assert options["--app-name"] == "basic-auth"
    argv = [sys.executable, "-m", "fewsound", "mlflow", "serve"]
    for k, v in options.items():
        argv += [k, local.get(k, v)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not tracking._healthy(uri):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=5"
        assert _request(api) == 401  # no login
        assert _request(api, login=(login[0], "not-the-password")) == 401
        assert _request(api, login=login) == 200
        assert _request(api, login=login, host=f"{HEAD_IP}:5000") == 200  # how jobs and trials address it
        assert _request(api, login=login, host="localhost:5000") == 200  # the laptop, through SSH forwarding
        assert _request(api, login=login, host="mlflow.attacker.example:5000") == 403  # DNS rebinding
        assert _request(api, login=login, host="10.0.9.9:5000") == 403  # another private address (MLflow allows)
        assert login[1] not in (tmp_path / "serve.log").read_text()  # the secret never reaches the log

        # a real job on a node: its MLflow client reads the login from ~/.mlflow/credentials, nothing else (one
        # clip: a parent run and its two child runs say as much as the smoke test's six)
        job_env = dict(env, HOME=str(node), MLFLOW_TRACKING_URI=uri, FEWSOUND_HOME=str(node / ".fewsound"))
        # a job on a machine without the login: one line that says so, before any work (no fit, no traceback)
        stranger = dict(job_env, HOME=str(tmp_path / "stranger"))
        cmd = [sys.executable, "jobs/fit_inrs.py", "--smoke-test", "--clips", "1", "--experiment", "secure-smoke"]
        refused = subprocess.run(cmd, cwd=REPO, env=stranger, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert f"{uri}: the tracking server wants a login" in refused.stderr, refused.stderr[-3000:]
        assert not (node / ".fewsound" / "records").exists()  # nothing fitted
        job = subprocess.run(
            [sys.executable, "jobs/fit_inrs.py", "--smoke-test", "--clips", "1", "--experiment", "secure-smoke"],
            cwd=REPO,
            env=job_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = login
        try:
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("secure-smoke")
            runs = client.search_runs([exp.experiment_id], max_results=100)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        finished = [r for r in runs if r.info.status == "FINISHED"]
        children = [r for r in finished if tracking.PARENT_TAG in r.data.tags]
        assert children and len(finished) > len(children), [(r.info.run_name, r.info.status) for r in runs]
        assert all("eval/psnr" in r.data.metrics for r in children)
        assert (node / "mlflow" / "basic_auth.db").is_file()  # the users live on the head's disk ...
        assert not (tmp_path / "bucket" / "basic_auth.db").exists()  # ... never in the bucket
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:  # never left running (its gunicorn included)
            kill_tree(server)
        finally:
            log.close()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
