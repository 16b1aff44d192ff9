"""A real Flink session cluster on this machine, for bft's Beam passes: fetch, start, stop, status.

    scripts/flink_local.sh fetch             Flink from PyPI, Beam's Flink job server built from Maven Central
    scripts/flink_local.sh start [--dir D]   a JobManager, two TaskManagers (separate JVMs), Beam's Flink job
                                             server pointed at them; the last line printed
                                             is the bft flags that run a pass on it
    scripts/flink_local.sh stop  [--dir D]   everything `start` started, and the SDK workers they started
    scripts/flink_local.sh status [--dir D]  the cluster's REST overview, one JSON line

Where the parts come from (all cached under .cache/flink, or $BFT_FLINK_CACHE; fetch is idempotent):
- Flink 1.19.3 itself: the `apache-flink-libraries` wheel ships `lib/` (flink-dist) and `apache-flink` ships
  `bin/` and `conf/`; both are installed with --no-deps into their own folder (apache-flink pins an old Beam).
- Beam's Flink job server: Maven Central serves no `beam-runners-flink-*-job-server` jar that this machine can
  fetch, so the same jar is built here with Maven's shade plugin from `beam-runners-flink-1.19` and its
  dependencies (main class `FlinkJobServerDriver`, as in Beam's own job-server build). Beam 2.62.0 is the newest
  release whose Flink runner and job service both resolve from Maven Central here: 2.63-2.77 lack the runner
  or `beam-runners-java-job-service`. The Python SDK stays at the project's Beam (2.77); the tests prove
  that the pair gives the local runner's output file by file. `--runner FlinkRunner` on a machine that can
  fetch Beam's published jar gets the job server of the SDK's own version instead.
- Python workers: Beam's PROCESS environment, each TaskManager starting its own workers with a boot command
  written here (beam_pipelines/runtime/process_worker.py in this venv, in place of Beam's Go boot binary, which
  the wheel lacks), so every SDK worker imports the same Beam and bft as the driver. Not an EXTERNAL worker
  pool: several TaskManagers sharing one pool end each other's workers (process_worker.py says why);
  DOCKER needs a Docker engine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

FLINK_VERSION = "1.19.3"
FLINK_MINOR = "1.19"
JOB_SERVER_BEAM = "2.62.0"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BFT_FLINK_CACHE") or os.path.join(REPO, ".cache", "flink")
START_TIMEOUT_S = 120
# Flink's own launcher flags for Java 17 (conf/config.yaml of the distribution): its RPC and Kryo need them
JAVA_OPENS = ("--add-exports=java.base/sun.net.util=ALL-UNNAMED --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED "
              + " ".join(f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
                  "java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect", "java.text",
                  "java.time", "java.util", "java.util.concurrent", "java.util.concurrent.atomic",
                  "java.util.concurrent.locks")))

SHADE_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>bft</groupId><artifactId>beam-flink-job-server</artifactId><version>{beam}</version>
  <properties><project.build.sourceEncoding>UTF-8</project.build.sourceEncoding></properties>
  <dependencies>
    <dependency><groupId>org.apache.beam</groupId><artifactId>beam-runners-flink-{minor}</artifactId>
      <version>{beam}</version></dependency>
  </dependencies>
  <build><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId><artifactId>maven-shade-plugin</artifactId><version>3.6.0</version>
    <executions><execution><phase>package</phase><goals><goal>shade</goal></goals><configuration>
      <createDependencyReducedPom>false</createDependencyReducedPom>
      <filters><filter><artifact>*:*</artifact><excludes><exclude>META-INF/*.SF</exclude>
        <exclude>META-INF/*.DSA</exclude><exclude>META-INF/*.RSA</exclude></excludes></filter></filters>
      <transformers>
        <transformer implementation="org.apache.maven.plugins.shade.resource.ServicesResourceTransformer"/>
        <transformer implementation="org.apache.maven.plugins.shade.resource.ManifestResourceTransformer">
          <mainClass>org.apache.beam.runners.flink.FlinkJobServerDriver</mainClass></transformer>
      </transformers>
    </configuration></execution></executions>
  </plugin></plugins></build>
</project>
"""


class ClusterError(RuntimeError):
    """One line for the user: what is missing or what failed, and where its log is."""


def flink_home() -> str:
    return os.path.join(CACHE, f"flink-{FLINK_VERSION}", "pyflink")


def job_server_jar() -> str:
    return os.path.join(CACHE, f"beam-runners-flink-{FLINK_MINOR}-job-server-{JOB_SERVER_BEAM}.jar")


def missing_tools() -> list[str]:
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def fetch() -> None:
    """Flink's distribution and the job server jar into the cache; does nothing when both are there."""
    missing = missing_tools()
    if missing:
        raise ClusterError(f"the Flink cluster needs {' and '.join(missing)} (Java 17 and Maven): missing "
                           f"{', '.join(missing)}; install them (Debian: apt-get install openjdk-17-jre-headless "
                           f"maven) or run the tests without Flink (BFT_FLINK=0)")
    os.makedirs(CACHE, exist_ok=True)
    home = flink_home()
    if not os.path.exists(os.path.join(home, "lib", f"flink-dist-{FLINK_VERSION}.jar")):
        target = tempfile.mkdtemp(prefix=".flink-", dir=CACHE)
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
              f"apache-flink-libraries=={FLINK_VERSION}", f"apache-flink=={FLINK_VERSION}"], "pip install Flink")
        final = os.path.dirname(home)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(target, final)   # whole or not at all
    jar = job_server_jar()
    if not os.path.exists(jar):
        build = tempfile.mkdtemp(prefix=".job-server-", dir=CACHE)
        with open(os.path.join(build, "pom.xml"), "w") as f:
            f.write(SHADE_POM.format(beam=JOB_SERVER_BEAM, minor=FLINK_MINOR))
        _run(["mvn", "-q", "-B", "package"], "mvn package (Beam's Flink job server)", cwd=build)
        os.replace(os.path.join(build, "target", f"beam-flink-job-server-{JOB_SERVER_BEAM}.jar"), jar)
        shutil.rmtree(build, ignore_errors=True)


def _run(cmd: list[str], what: str, cwd: str | None = None, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise ClusterError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A distinct free port per name: every socket is held until all are bound (ports taken one at a
    time can repeat: Flink's REST API once got the job server's port, which then never started, while
    the port answered)."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return {name: s.getsockname()[1] for name, s in zip(names, sockets)}
    finally:
        for s in sockets:
            s.close()


def write_conf(conf: str, ports: dict, args) -> None:
    os.makedirs(conf, exist_ok=True)
    for name in os.listdir(os.path.join(flink_home(), "conf")):
        if name.startswith("log4j"):
            shutil.copy(os.path.join(flink_home(), "conf", name), conf)
    # Flink 1.19's config.yaml accepts flat keys; the network buffers: Beam's batch translation runs a
    # stage's tasks with many channels (512 buffers for one of prepare's tasks at parallelism 2)
    settings = {
        "env.java.opts.all": JAVA_OPENS,
        "jobmanager.rpc.address": "127.0.0.1", "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.rpc.port": ports["rpc"], "jobmanager.memory.process.size": args.jm_memory,
        "taskmanager.host": "127.0.0.1", "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.numberOfTaskSlots": args.slots, "taskmanager.memory.process.size": args.tm_memory,
        "taskmanager.memory.network.min": args.network_memory, "taskmanager.memory.network.max": args.network_memory,
        # Beam's gRPC data plane to the Python workers allocates direct buffers, which Flink counts as task
        # off-heap memory (default 0): at 1M documents a TaskManager died of "Direct buffer memory" without it
        "taskmanager.memory.task.off-heap.size": args.task_off_heap,
        # the rest to the heap, where Beam's runner decodes the workers' gRPC messages (a 225 MiB heap ran
        # out at 1M documents); Flink's own sorts then spill to disk sooner
        "taskmanager.memory.managed.fraction": 0.1,
        # an error in a thread of no task (Beam's gRPC executor out of memory) fails the TaskManager and so
        # the job, instead of leaving the job waiting forever on the dead thread's data
        "cluster.uncaught-exception-handling": "FAIL",
        "cluster.evenly-spread-out-slots": "true",
        "parallelism.default": args.parallelism,
        "rest.address": "127.0.0.1", "rest.bind-address": "127.0.0.1", "rest.port": ports["rest"],
        "blob.server.port": ports["blob"],
        "io.tmp.dirs": os.path.join(os.path.dirname(conf), "tmp"),
    }
    os.makedirs(settings["io.tmp.dirs"], exist_ok=True)
    with open(os.path.join(conf, "config.yaml"), "w") as f:
        for key, value in settings.items():
            f.write(f"{key}: {json.dumps(value) if isinstance(value, str) else value}\n")


def flink_env(state: str) -> dict:
    return {**os.environ, "FLINK_HOME": flink_home(), "FLINK_CONF_DIR": os.path.join(state, "conf"),
            "FLINK_LOG_DIR": os.path.join(state, "log"), "FLINK_PID_DIR": state, "FLINK_IDENT_STRING": "bft"}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def _wait(check, what: str, log: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with {proc.returncode} before it was ready; see {log}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise ClusterError(f"{what} not ready after {START_TIMEOUT_S}s; see {log}")


def _listening(port: int):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=0.5).close() is None


def _spawn(cmd: list[str], log: str, env: dict) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=os.path.dirname(log))


def write_worker_boot(state: str) -> str:
    """The command each TaskManager runs to start a Python SDK worker (Beam's PROCESS environment):
    beam_pipelines/runtime/process_worker.py with this venv's Python, which has Beam and bft."""
    path = os.path.join(state, "beam_worker_boot")
    venv_bin = os.path.dirname(sys.executable)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n# Beam's PROCESS environment: a Python SDK worker from {venv_bin}\n"
                f"export PATH=\"{venv_bin}:$PATH\" PYTHONPATH=\"{REPO}${{PYTHONPATH:+:$PYTHONPATH}}\"\n"
                f"exec \"{sys.executable}\" -m beam_pipelines.runtime.process_worker \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def beam_flags(record: dict, env: dict | None = None) -> list[str]:
    """The flags that run a bft pass on the cluster (`bft prepare ... FLAGS`); `env`: variables for the
    workers (e.g. STORAGE_EMULATOR_HOST)."""
    config = {"command": record["worker_boot"], **({"env": env} if env else {})}
    return ["--runner=PortableRunner", f"--job_endpoint=localhost:{record['ports']['job']}",
            "--environment_type=PROCESS", f"--environment_config={json.dumps(config)}",
            f"--parallelism={record['parallelism']}", "--environment_cache_millis=60000"]


def start(args) -> dict:
    fetch()
    state = os.path.abspath(args.dir)
    if os.path.exists(os.path.join(state, "cluster.json")):
        raise ClusterError(f"a cluster is recorded in {state} already: `{sys.argv[0]} stop --dir {state}` first")
    log_dir = os.path.join(state, "log")
    os.makedirs(log_dir, exist_ok=True)
    ports = free_ports(("rpc", "rest", "blob", "job", "artifact", "expansion"))
    record = {"dir": state, "ports": ports, "parallelism": args.parallelism, "taskmanagers": args.taskmanagers,
              "flink": FLINK_VERSION, "job_server_beam": JOB_SERVER_BEAM, "pids": {}}
    write_conf(os.path.join(state, "conf"), ports, args)
    env = flink_env(state)
    bin_dir = os.path.join(flink_home(), "bin")
    try:
        _run(["bash", os.path.join(bin_dir, "jobmanager.sh"), "start"], "the JobManager's start", env=env)
        for _ in range(args.taskmanagers):
            _run(["bash", os.path.join(bin_dir, "taskmanager.sh"), "start"], "a TaskManager's start", env=env)
        rest = f"http://127.0.0.1:{ports['rest']}"
        _wait(lambda: _get(f"{rest}/overview")["taskmanagers"] == args.taskmanagers,
              f"the Flink cluster ({args.taskmanagers} TaskManagers)", log_dir)
        java_log = os.path.join(log_dir, "job-server.log")
        proc = _spawn(["java", *JAVA_OPENS.split(), "-cp", job_server_jar(), "org.apache.beam.runners.flink.FlinkJobServerDriver",
                       "--flink-master", f"127.0.0.1:{ports['rest']}", "--job-port", str(ports["job"]),
                       "--artifact-port", str(ports["artifact"]), "--expansion-port", str(ports["expansion"])],
                      java_log, os.environ.copy())
        record["pids"]["job_server"] = proc.pid
        _save(state, record)
        _wait(_listening(ports["job"]), "Beam's Flink job server", java_log, proc)
        time.sleep(1)
        if proc.poll() is not None:   # the port answered, but not for it
            raise ClusterError(f"Beam's Flink job server exited with {proc.returncode}; see {java_log}")
        record["worker_boot"] = write_worker_boot(state)
    except BaseException:
        stop(state)
        raise
    record["flags"] = beam_flags(record)
    record["rest"] = rest
    _save(state, record)
    return record


def _save(state: str, record: dict) -> None:
    tmp = os.path.join(state, ".cluster.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(state, "cluster.json"))


def load(state: str) -> dict:
    with open(os.path.join(state, "cluster.json")) as f:
        return json.load(f)


def stop(state: str) -> None:
    """Ends the job server (its process group), then every Flink daemon recorded in the state folder
    (the SDK workers a TaskManager started end with it)."""
    state = os.path.abspath(state)
    try:
        record = load(state)
    except (OSError, ValueError):
        record = {"pids": {}}
    for pid in reversed(list(record.get("pids", {}).values())):
        _end_group(pid)
    if os.path.isdir(flink_home()):
        env = flink_env(state)
        for daemon in ("taskmanager.sh", "jobmanager.sh"):
            subprocess.run(["bash", os.path.join(flink_home(), "bin", daemon), "stop-all"], env=env,
                           capture_output=True, timeout=60)
    current = os.path.join(state, "cluster.json")
    if os.path.exists(current):   # kept for its logs' sake, no longer a running cluster
        os.replace(current, os.path.join(state, "cluster.stopped.json"))


def _end_group(pid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def status(state: str) -> dict:
    record = load(state)
    return {**_get(f"{record['rest']}/overview"), "rest": record["rest"], "flags": record["flags"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/flink_local.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("fetch", "start", "stop", "status"))
    parser.add_argument("--dir", default=os.path.join(CACHE, "cluster"),
                        help="the cluster's state folder: its config, logs, ports and pids (default: %(default)s)")
    parser.add_argument("--taskmanagers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2, help="task slots per TaskManager")
    parser.add_argument("--parallelism", type=int, default=2, help="the passes' parallelism (--parallelism)")
    parser.add_argument("--jm-memory", default="1024m", help="the JobManager's process size")
    parser.add_argument("--tm-memory", default="3072m", help="each TaskManager's process size")
    parser.add_argument("--task-off-heap", default="768m", help="each TaskManager's task off-heap (direct) memory")
    parser.add_argument("--network-memory", default="384m", help="each TaskManager's network buffers")
    args = parser.parse_args(argv)
    try:
        if args.action == "fetch":
            fetch()
            print(f"Flink {FLINK_VERSION}: {flink_home()}\njob server: {job_server_jar()}")
        elif args.action == "start":
            record = start(args)
            print(f"Flink {FLINK_VERSION} at {record['rest']} ({args.taskmanagers} TaskManagers), Beam's job server "
                  f"(Beam {JOB_SERVER_BEAM}) on localhost:{record['ports']['job']}, Python workers started by "
                  f"{record['worker_boot']}; logs in {os.path.join(record['dir'], 'log')}")
            print(" ".join(shlex.quote(flag) for flag in record["flags"]))
        elif args.action == "stop":
            stop(args.dir)
        else:
            print(json.dumps(status(args.dir)))
    except ClusterError as e:
        print(f"flink_local: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as e:
        if args.action == "status":
            print(f"flink_local: no running cluster recorded in {args.dir} ({e})", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
