"""A real S3-compatible server for tests: moto in server mode, as a subprocess on a free port.

    with MotoS3() as s3:
        s3.env                  AWS_* variables that point any S3 client (pyarrow, boto3, MLflow) at it
        s3.create_bucket("b")
        s3.keys("b", "corpus/")  object keys under a prefix

Everything talks to it over HTTP exactly as to AWS (the standard AWS_ENDPOINT_URL variable selects it), so
the code under test has no test-only path.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class MotoS3:
    def __init__(self, log: Path):
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,  # MLflow's server reads this one for its artifact store
        }

    def __enter__(self) -> MotoS3:
        moto = Path(sys.executable).with_name("moto_server")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", "0"],  # port 0: the OS picks a free one, moto prints it
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.log_path.read_text(errors="replace"))
            if m:
                self.endpoint = m.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"moto_server did not start: {self.log_path.read_text(errors='replace')[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        self._log.close()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client().list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(out)
