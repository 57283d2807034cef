"""A real single-node SLURM cluster for the tests: munged + slurmctld + slurmd on this machine.

Everything lives in a temporary folder (munge key, socket and logs; slurm.conf; state and spool
folders; daemon logs) and the daemons run in the foreground as children of the test process, so
stopping them leaves nothing behind. Client commands (sbatch, squeue, scontrol, scancel, sinfo) find
the cluster through ``SLURM_CONF``, which the fixture sets for the whole session; jobs inherit it.

Debian's ``slurm-wlm`` and ``munge`` packages provide the binaries (``.ci/run`` installs them as root);
without them, or when not root (slurmd must start jobs as the submitting user), the tests that use
the fixture skip with the reason. There is no accounting database (``sacct`` says accounting is
disabled), exactly as on the minimal clusters the experiment's ``status`` must work with.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def missing_reason() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM/munge binaries not found ({', '.join(missing)}): apt-get install -y slurm-wlm munge "
                "(.ci/run does this as root)")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as the submitting user)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 2048


class LocalSlurm:
    """One-node cluster in ``root``; :meth:`start` waits until ``sinfo`` shows the node idle."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        cpus = os.cpu_count() or 1
        memory = max(256, int(_available_memory_mb() * 0.8))
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=l1dfltest",
            f"SlurmctldHost={self.node}(127.0.0.1)",  # no name resolution needed
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=600",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _spawn(self, cmd: list[str], log_name: str) -> None:
        log = (self.root / "log" / log_name).open("ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        log.close()

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", "--keyfile", str(key), "--force"], check=True,
                       capture_output=True)
        os.chmod(key, 0o400)
        m = self.root / "munge"
        self._spawn([_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                     f"--seed-file={m / 'munged.seed'}"], "munged.out")
        self._wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout,
                   "slurmctld did not answer 'scontrol ping'")
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd.out")
        self._wait(self._node_idle, timeout, "the node did not become idle in sinfo")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return bool(out) and all(s.rstrip("*~#") == "idle" for s in out)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: {proc.args[0]} exited with {proc.returncode}; logs:\n{self.logs()}")
            try:
                if ready():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s; logs:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        try:  # cancel what is left so that slurmd kills its job steps
            self.run("scancel", "--user", str(os.getuid()), check=False, timeout=10)
            time.sleep(1)
        except (subprocess.SubprocessError, OSError):
            pass
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 15)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(timeout=5)
        self.procs.clear()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """A started one-node cluster; ``SLURM_CONF`` points at it for the session. Skips without SLURM."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="l1dfl_slurm_"))
    cluster = LocalSlurm(root)
    previous = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
