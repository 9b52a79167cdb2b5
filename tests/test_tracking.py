"""The embedded tracking default: a real MLflow server on 127.0.0.1 over SQLite, reused across jobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import free_port  # tests/support.py

from fewsound import tracking
from fewsound.config import cfg_hash, flatten, from_flat, override
from fewsound.errors import ConfigError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-home")
    uri = tracking.start_local_server(home=home, port=None)
    yield home, uri
    assert tracking.stop_local_server(home)


def test_server_is_reused_and_backed_by_sqlite(server):
    home, uri = server
    assert uri.startswith("http://127.0.0.1:")
    assert tracking.start_local_server(home=home) == uri  # second job: same server, no new process
    assert (home / "mlflow.db").exists()


def test_the_embedded_server_listens_on_loopback_only_and_wants_no_login(server):
    """The laptop's server (issue 26): bound to 127.0.0.1 only, so no other address of the machine reaches it (not
    0.0.0.0, not ::), and answered without a login (no authentication app)."""
    import urllib.request

    _, uri = server
    port = int(uri.rsplit(":", 1)[1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # Linux's socket tables: local address, state (0A: LISTEN)
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                listening.add(address)
    assert listening == {"0100007F"}, listening  # 127.0.0.1, in the table's little-endian hex
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30) as r:
        assert r.status == 200  # no Authorization header sent


def test_parent_child_runs_with_params_metrics_artifacts(server, tmp_path):
    _, uri = server
    parent = tracking.MlflowRun("test-tracking", uri=uri, run_name="sweep")
    child = tracking.MlflowRun("test-tracking", uri=uri, run_name="fit", parent_run_id=parent.run_id)
    child.log_params({f"p{i}": i for i in range(150)})  # more than one MLflow batch
    for step in range(3):
        child.log_metrics({"fit/loss": 1.0 / (step + 1)}, step=step)
    wav = tmp_path / "pred.wav"
    from fewsound.data.audio import save_audio

    save_audio(wav, np.zeros(100, np.float32) + 0.1, 22050)
    child.log_artifact(wav, "audio")
    child.end()
    parent.end()
    run = child.client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.PARENT_TAG] == parent.run_id
    assert run.data.params["p149"] == "149"
    hist = child.client.get_metric_history(child.run_id, "fit/loss")
    assert [m.step for m in hist] == [0, 1, 2]
    assert [a.path for a in child.client.list_artifacts(child.run_id, "audio")] == ["audio/pred.wav"]


def test_server_store_is_sqlite_in_wal_mode(server):
    import sqlite3

    home, _ = server
    with sqlite3.connect(home / "mlflow.db") as db:  # WAL is a property of the file, set by the server's hook
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_log_run_reads_back_like_a_client_run(server, tmp_path):
    """A whole child run in one call: tags, params and a curve over several of MLflow's batches, final metrics;
    RUNNING until its artifacts are up, then FINISHED; FAILED as given."""
    _, uri = server
    parent = tracking.MlflowRun("test-tracking", uri=uri, run_name="sweep")
    client = parent.client
    curve = [(s, 1.0 / (s + 1)) for s in range(0, 15000, 10)]  # 1,500 points: more than one batch
    rid = tracking.log_run(
        client,
        parent.experiment_id,
        run_name="fit-1",
        tags={tracking.PARENT_TAG: parent.run_id, "fewsound.key": "k1", "fewsound.na.pesq": "too short"},
        params={f"p{i}": i for i in range(130)},
        metrics={"psnr": 31.25, "pesq": 1.5},
        curves={"fit/loss_curve": curve},
        status="RUNNING",
    )
    assert client.get_run(rid).info.status == "RUNNING"
    wav = tmp_path / "gt.wav"
    from fewsound.data.audio import load_audio, save_audio

    save_audio(wav, np.linspace(-0.5, 0.5, 2205, dtype=np.float32), 22050)
    client.log_artifact(rid, str(wav), "audio")
    client.set_terminated(rid, "FINISHED")
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "fit-1" and run.info.end_time
    assert run.data.tags[tracking.PARENT_TAG] == parent.run_id and run.data.tags["fewsound.na.pesq"] == "too short"
    assert run.data.params["p129"] == "129" and len(run.data.params) == 130
    assert run.data.metrics["psnr"] == 31.25
    assert run.data.metrics["fit/loss_curve"] == curve[-1][1]  # MLflow's latest value of a curve: its last step
    hist = client.get_metric_history(rid, "fit/loss_curve")
    assert [(m.step, m.value) for m in hist] == curve
    back = client.download_artifacts(rid, "audio/gt.wav", str(tmp_path / "dl"))
    np.testing.assert_allclose(load_audio(back, sr=None), np.linspace(-0.5, 0.5, 2205), atol=1e-6)
    failed = tracking.log_run(
        client, parent.experiment_id, run_name="fit-2", tags={tracking.PARENT_TAG: parent.run_id}, status="FAILED"
    )
    assert client.get_run(failed).info.status == "FAILED"
    found = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent.run_id}' and attributes.status = 'FINISHED'",
    )
    assert [r.info.run_id for r in found] == [rid]


def test_file_store_uri_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri()


def test_config_flatten_round_trip_and_hash():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Inner:
        widths: tuple[int, ...] = (48, 24, 12)
        grid: int = 10

    @dataclass(frozen=True)
    class Outer:
        inr: Inner = field(default_factory=Inner)
        lr: float = 5e-3

    cfg = Outer()
    flat = flatten(cfg)
    assert flat == {"inr.widths": [48, 24, 12], "inr.grid": 10, "lr": 5e-3}
    assert from_flat(Outer, flat) == cfg
    changed = override(cfg, **{"inr.grid": 5})
    assert changed.inr.grid == 5 and cfg_hash(changed) != cfg_hash(cfg)
    assert cfg_hash(Outer()) == cfg_hash(cfg)
    with pytest.raises(ConfigError, match="inr.gird"):
        override(cfg, **{"inr.gird": 5})


@pytest.mark.integration
def test_runs_reach_a_server_with_mlflows_basic_auth(tmp_path, monkeypatch):
    """The cluster's server may run MLflow's own authentication app (`--app-name basic-auth`): fewsound logs
    through MLflow's client, so MLflow's credential variables are all a job needs; without them, MLflow refuses."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    conf = Path(tracking.__file__).with_name("mlflow_gunicorn.py")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--gunicorn-opts", f"--config {conf}"]
    env = dict(
        os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "auth.ini")
    )
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "s3cret-for-test"
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "csrf-key-for-test"  # the auth app refuses to start without one
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not tracking._healthy(uri):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-for-test")
        parent = tracking.MlflowRun("test-auth", uri=uri, run_name="sweep")
        rid = tracking.log_run(
            parent.client,
            parent.experiment_id,
            run_name="fit",
            tags={tracking.PARENT_TAG: parent.run_id},
            params={"lr": "0.005"},
            metrics={"psnr": 30.0},
        )
        run = parent.client.get_run(rid)
        assert run.info.status == "FINISHED" and run.data.metrics["psnr"] == 30.0
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        from mlflow.tracking import MlflowClient

        with pytest.raises(MlflowException, match="401|[Uu]nauthori[sz]ed|credentials"):
            MlflowClient(uri).get_run(rid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        log.close()


def test_experiments_open_on_runs_in_mlflows_ui(server):
    """MLflow 3's UI opens an experiment on its kind's layout: ours are model-training experiments, also one
    that an older version made without the tag."""
    from mlflow.tracking import MlflowClient

    _, uri = server
    client = MlflowClient(uri)
    exp_id = tracking.get_or_create_experiment(client, "kind-new")
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("kind-old")
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.get_or_create_experiment(client, "kind-old") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(old, tracking.EXPERIMENT_KIND_TAG, "genai_development")  # the user's choice stays
    tracking.get_or_create_experiment(client, "kind-old")
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.mark.integration  # starts an embedded MLflow server
def test_mlflow_status_and_stop_commands(tmp_path, monkeypatch, capsys):
    """`python -m fewsound mlflow status|stop` on the embedded server of a FEWSOUND_HOME (the command's main, in
    this process)."""
    import urllib.request

    from fewsound.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("FEWSOUND_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def cli(*args: str) -> tuple[int, str]:
        code = main(["mlflow", *args])
        return code, capsys.readouterr().out

    code, out = cli("status")
    assert code == 1 and "no MLflow server running" in out
    uri = tracking.start_local_server(home=home, port=None)
    code, out = cli("status")
    assert code == 0, out
    assert f"MLflow server running at {uri}" in out and str(home.resolve() / "mlflow.db") in out
    code, out = cli("stop")
    assert code == 0 and f"stopped the MLflow server at {uri}" in out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    assert cli("status")[0] == 1
    assert "no MLflow server was running" in cli("stop")[1]


@pytest.mark.integration  # starts two embedded MLflow servers
def test_two_homes_starting_servers_at_once_each_get_their_own(tmp_path):
    """Both try the default port at the same moment; the one that loses it must not take the other's answers on
    that port for its own server (its runs would land in the other home's store): it starts on a free port."""
    import threading

    from mlflow.tracking import MlflowClient

    homes = [tmp_path / "a", tmp_path / "b"]
    uris: dict[Path, str] = {}
    errors: list[BaseException] = []

    def start(home: Path) -> None:
        try:
            uris[home] = tracking.start_local_server(home)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=start, args=(h,)) for h in homes]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(set(uris.values())) == 2, uris
        for home in homes:  # each URI is served from its own home's store
            MlflowClient(uris[home]).create_experiment(f"only-in-{home.name}")
            assert tracking.start_local_server(home) == uris[home]
        for home, other in (homes, homes[::-1]):
            names = {e.name for e in MlflowClient(uris[home]).search_experiments()}
            assert f"only-in-{home.name}" in names and f"only-in-{other.name}" not in names
    finally:
        for home in homes:
            tracking.stop_local_server(home)
