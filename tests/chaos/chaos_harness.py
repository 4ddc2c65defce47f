"""The chaos harness: a real multi-node Ray on loopback, the trainer as its own process, faults from outside.

- `LocalCluster`: a 0-CPU head and 1-CPU worker nodes, each a `ray start --block` process on 127.0.0.1 (the
  layout of cluster/local_cluster.sh), so a node can be SIGTERMed the way spot capacity does it (Ray then
  drains it with reason PREEMPTION), drained by hand (`ray drain-node`), or killed outright.
- `Driver`: `python jobs/stage1.py ...` against that cluster, in its own process (it can be SIGKILLed and
  run again).
- `StepTail`: follows the run's metrics.jsonl (one line per trained step, `run.log_every=1`) and keeps every
  line it ever saw, so work that a restart redoes (and the next attempt's rewind drops) is still counted.
- `analyse` + `Report`: the per-scenario figures, written to runs/chaos/report.json and report.md.
Every process started here is stopped by PID (its descendants first), never by name.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray_mmd.train import checkpoint
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
REPORT_DIR = ROOT / "runs" / "chaos"
GBS = 16
# fast node-death detection (Ray's own fault-tolerance tests shorten the same health checks)
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def descendants(pid: int) -> list[tuple[int, str]]:
    ps = _procs()
    kids: dict[int, list[int]] = {}
    for p, (pp, _) in ps.items():
        kids.setdefault(pp, []).append(p)
    out, front = [], [pid]
    while front:
        for k in kids.get(front.pop(), []):
            out.append((k, ps[k][1]))
            front.append(k)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """`pid` and everything it started, children first."""
    for p, _ in reversed(descendants(pid)):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    port: int  # node manager port: how ray.nodes() names it
    log: Path
    node_id: str = ""
    gone: bool = False


class LocalCluster:
    """Head (0 CPUs: only the driver and the Train controller live there) + 1-CPU worker nodes."""

    def __init__(self, workdir: Path, workers: int = 2) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {
            **os.environ,
            **FAST_HEALTH,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": f"{Path(PY).parent}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            # a safety net: after a node dies, Ray Train's elastic policy may still count its CPUs for a
            # moment and wait for a placement that never comes (60 s by default) before deciding again
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.head: Node | None = None
        self.nodes: list[Node] = []
        self.head = self._start(
            "head",
            ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false"]
            + [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        )
        for _ in range(workers):
            self.add_worker()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        log = self.dir / f"{name}.log"
        nm_port = free_port()
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--node-manager-port={nm_port}"]
        cmd += [f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args]
        proc = subprocess.Popen(
            cmd,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )
        node = Node(name, proc, nm_port, log)
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        return node

    def add_worker(self, env: dict[str, str] | None = None) -> Node:
        """One more 1-CPU worker node (started one at a time: two raylets starting at once can race)."""
        n = self._start(f"worker{len(self.nodes) + 1}", [f"--address={self.address}", "--num-cpus=1"], env)
        self.nodes.append(n)
        return n

    # -- looking at it ------------------------------------------------------------------------------

    def node_id(self, node: Node) -> str:
        """The node's id, read from its raylet's command line (no Ray client needed)."""
        if not node.node_id:
            for _, cmd in descendants(node.proc.pid):
                if "/raylet " in cmd and "--node_id=" in cmd:
                    node.node_id = cmd.split("--node_id=", 1)[1].split()[0]
        if not node.node_id:
            raise RuntimeError(f"no raylet under node {node.name}")
        return node.node_id

    def train_workers(self) -> dict[int, Node]:
        """pid -> node of every live Ray Train worker process."""
        out = {}
        for n in self.live():
            for pid, cmd in descendants(n.proc.pid):
                if "RayTrainWorker" in cmd:
                    out[pid] = n
        return out

    def live(self) -> list[Node]:
        return [n for n in self.nodes if not n.gone and n.proc.poll() is None]

    def wait_train_workers(self, n: int, timeout: float = 120) -> dict[int, Node]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = self.train_workers()
            if len(w) >= n:
                return w
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {n} train workers after {timeout}s")

    # -- faults -------------------------------------------------------------------------------------

    def kill_node(self, node: Node) -> None:
        """The VM goes: the node's raylet, workers and `ray start` process, SIGKILL."""
        node.gone = True
        kill_tree(node.proc.pid)
        node.proc.wait()

    def sigterm_node(self, node: Node) -> None:
        """What a GCE spot reclaim (ACPI soft-off) or a pod deletion does to `ray start --block`."""
        node.proc.send_signal(signal.SIGTERM)

    def drain_node(self, node: Node, deadline_s: int, message: str = "chaos: spot reclaim") -> None:
        node_id = self.node_id(node)
        subprocess.run(
            [RAY, "drain-node", f"--address={self.address}", f"--node-id={node_id}"]
            + ["--reason=DRAIN_NODE_REASON_PREEMPTION", f"--reason-message={message}"]
            + [f"--deadline-remaining-seconds={deadline_s}"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def shutdown(self) -> None:
        for n in [*self.nodes, self.head]:
            if n is not None and n.proc.poll() is None:
                kill_tree(n.proc.pid)
                n.proc.wait()


class Driver:
    """The training command (jobs/stage1.py) against the cluster, in its own process."""

    def __init__(self, cluster: LocalCluster, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.cluster, self.args, self.log, self.extra = cluster, args, log, env or {}
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> Driver:
        self.runs += 1
        env = {**self.cluster.env, "RAY_ADDRESS": self.cluster.address, **self.extra}
        self.proc = subprocess.Popen(
            [PY, str(ROOT / "jobs" / "stage1.py"), *self.args],
            stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class StepTail(threading.Thread):
    """Every metrics.jsonl line ever written, as first seen (the next attempt rewinds the file)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.seen: dict[str, dict[str, Any]] = {}
        self.lines: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            time.sleep(0.05)

    def poll(self) -> None:
        try:
            text = self.path.read_text()
        except OSError:
            return
        for raw in text.splitlines():
            if raw in self.seen:
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # a line being written
            with self.lock:
                self.seen[raw] = rec
                self.lines.append(rec)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.poll()

    def train(self) -> list[dict[str, Any]]:
        with self.lock:
            return [x for x in self.lines if x["kind"] == "train"]

    def last_step(self) -> int:
        t = self.train()
        return t[-1]["step"] if t else 0

    def wait_step(self, step: int, timeout: float = 180) -> float:
        """Block until a step >= `step` is trained (by any attempt); return the time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for x in reversed(self.train()):
                if x["step"] >= step:
                    return x["time"]
            time.sleep(0.05)
        raise TimeoutError(f"step {step} not reached in {timeout}s (last {self.last_step()})")

    def next_step_after(self, t: float) -> float | None:
        """Time of the first step trained after wall time `t` (by a restored attempt, after a fault)."""
        later = [x["time"] for x in self.train() if x["time"] > t]
        return min(later) if later else None


def run_args(data: str, storage: str, name: str, epochs: int, *extra: str) -> list[str]:
    """A small stage-1 run: width 4, 32 px, global batch 16, one log line and one step time per step."""
    return [
        "--run-name",
        name,
        "--storage",
        storage,
        "--data",
        data,
        "run.progress=false",
        "run.log_every=1",
        "run.use_gpu=false",
        "model.width=4",
        "data.image_size=32",
        f"data.global_batch_size={GBS}",
        f"data.epochs={epochs}",
        "data.decode_workers=1",
        "optim.amp=off",
        "eval.max_samples=16",
        "eval.batch_size=16",
        "debug.record_ids=true",
        *extra,
    ]


@dataclass
class Fault:
    kind: str
    at: float  # unix time it took effect
    detail: str = ""
    at_step: int = 0  # last step trained when it was injected
    next_step_s: float | None = None  # fault -> next trained step


@dataclass
class Result:
    scenario: str
    what: str
    seed: int
    faults: list[Fault] = field(default_factory=list)
    restores: int = 0
    notices: int = 0
    samples_trained: int = 0
    samples_expected: int = 0
    exactly_once: bool = False
    steps_final: int = 0
    steps_executed: int = 0
    steps_lost: int = 0
    notice_to_checkpoint_s: list[float] = field(default_factory=list)
    bitwise: bool | None = None
    worlds: list[int] = field(default_factory=list)
    idle_s: float = 0.0  # time no step was trained, beyond 3x the median step time (restarts, hand-overs)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        nxt = [f.next_step_s for f in self.faults if f.next_step_s is not None]
        if self.bitwise is None:
            bit = "n/a (world changed)" if len(set(self.worlds)) > 1 else "not compared"
        else:
            bit = "yes" if self.bitwise else "NO"
        return [
            self.scenario,
            ", ".join(sorted({f.kind for f in self.faults})) + f" ({len(self.faults)})",
            str(self.restores),
            str(self.notices),
            f"{self.samples_trained}/{self.samples_expected}"
            + (" once" if self.exactly_once else " NOT once"),
            str(self.steps_lost),
            ("max " + f"{max(nxt):.1f}" + " / mean " + f"{sum(nxt) / len(nxt):.1f}") if nxt else "-",
            ", ".join(f"{x:.2f}" for x in self.notice_to_checkpoint_s) or "-",
            bit,
            "→".join(str(w) for w in self.worlds),
            f"{self.idle_s:.1f}",
            f"{self.wall_s:.0f}",
        ]


HEADER = [
    "scenario",
    "faults injected",
    "restores",
    "notices",
    "samples trained/expected",
    "steps lost",
    "fault → next step (s)",
    "notice → committed ckpt (s)",
    "bitwise = reference",
    "world sizes",
    "idle (s)",
    "wall (s)",
]


def _runs(seq: list[int]) -> list[int]:
    out: list[int] = []
    for w in seq:
        if not out or out[-1] != w:
            out.append(w)
    return out


def analyse(
    res: Result, run_dir: Path, data: str, epochs: int, tail: StepTail, reference: Path | None
) -> Result:
    """Fill `res` from the final checkpoint (ledger, restarts), the tail (steps executed) and the reference."""
    import torch

    from ray_mmd.data import manifest as mf

    sd, _, _ = checkpoint.final_checkpoint(str(run_dir))
    steps = sd["ids"]["steps"]
    train_ids = set(mf.load(data).sample_ids("train", 0, mf.load(data).id_end).tolist())
    per_epoch = len(train_ids) // GBS
    res.samples_expected = per_epoch * GBS * epochs
    ok = sorted(int(s) for s in steps) == list(range(per_epoch * epochs))
    trained = 0
    for e in range(epochs):
        ids = [
            i
            for s in range(e * per_epoch, (e + 1) * per_epoch)
            for i in steps.get(str(s), {"ids": []})["ids"]
        ]
        trained += len(ids)
        ok = ok and len(ids) == len(set(ids)) == per_epoch * GBS and set(ids) <= train_ids
    res.samples_trained, res.exactly_once = trained, ok
    res.restores = int(sd["progress"]["restarts"])
    res.steps_final = len(steps)
    res.worlds = _runs([steps[str(s)]["world"] for s in sorted(int(k) for k in steps)])
    train = tail.train()
    res.steps_executed = len(train)
    res.steps_lost = max(0, res.steps_executed - res.steps_final)
    times = sorted(x["time"] for x in train)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    if gaps:
        med = sorted(gaps)[len(gaps) // 2]
        res.idle_s = round(sum(g for g in gaps if g > 3 * med), 1)
    pre = [x for x in tail.lines if x["kind"] == "preemption"]
    res.notices = sum(1 for x in pre if "preempt/notices" in x)
    for f in res.faults:
        t = tail.next_step_after(f.at)
        f.next_step_s = None if t is None else round(t - f.at, 2)
    if reference is not None and len(set(res.worlds)) == 1:
        ref = checkpoint.final_checkpoint(str(reference))[0]["model"]
        res.bitwise = ref.keys() == sd["model"].keys() and all(
            torch.equal(ref[k], sd["model"][k]) for k in ref
        )
    return res


def write_report(res: Result, out_dir: Path = REPORT_DIR) -> None:
    """Merge this scenario into report.json (scenarios run in separate pytest calls add up) and redo report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    allr = json.loads(path.read_text()) if path.exists() else {}
    allr[res.scenario] = {**asdict(res), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(allr, indent=1))
    lines = [
        "# Chaos report",
        "",
        "Each scenario trains a small stage-1 run (width 4, 32 px, global batch 16) on a real local multi-node",
        "Ray (`ray start --block` processes on 127.0.0.1) and injects faults from outside the training process",
        "at seeded random steps. Samples come from the ledger in the final checkpoint (exactly once per epoch);",
        "steps lost = steps executed (every metrics line ever seen) - steps that count in the final weights.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for name in sorted(allr):
        fields = {k: v for k, v in allr[name].items() if k != "written"}
        r = Result(**{**fields, "faults": [Fault(**f) for f in fields["faults"]]})
        lines.append("| " + " | ".join(r.row()) + " |")
    lines += ["", "## Scenarios", ""]
    for name in sorted(allr):
        r = allr[name]
        lines.append(f"- **{name}** (seed {r['seed']}, {r['written']}): {r['what']}")
        for f in r["faults"]:
            lines.append(
                f"  - {f['kind']} after step {f['at_step']}: {f['detail']} (next step after {f['next_step_s']} s)"
            )
        for n in r["notes"]:
            lines.append(f"  - {n}")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def rng(seed: int) -> random.Random:
    return random.Random(seed)


def _code_digest() -> str:
    """What the reference's weights depend on: the trainer's source."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "ray_mmd").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def reference(refs: dict, cluster: LocalCluster, data: str, epochs: int) -> Path:
    """The uninterrupted run the fixed-world-size scenarios compare with bitwise: 2 workers, deterministic,
    the same schedule (checkpoint cadence, failure budgets and step sleeps do not change the weights).
    Trained once per (trainer source, dataset, epochs) and kept under runs/chaos/reference."""
    import hashlib

    extra = ["run.workers=2", "optim.deterministic=true", "checkpoint.every_steps=4"]
    manifest = (Path(data) / "manifest.json").read_bytes()
    key = f"ref-e{epochs}-{_code_digest()}-{hashlib.sha256(manifest).hexdigest()[:8]}"
    store = REPORT_DIR / "reference"
    if key not in refs["runs"]:
        run = store / key
        try:
            checkpoint.final_checkpoint(str(run))
        except Exception:
            store.mkdir(parents=True, exist_ok=True)
            d = Driver(cluster, run_args(data, str(store), key, epochs, *extra), store / f"{key}.log")
            rc = d.start().wait(300)
            assert rc == 0, d.output()[-4000:]
        refs["runs"][key] = run
    return refs["runs"][key]


class Scenario:
    """One chaos run: the driver in its own process, the step tail, the faults, then the report row."""

    def __init__(
        self,
        name: str,
        what: str,
        seed: int,
        cluster: LocalCluster,
        tmp: Path,
        data: str,
        epochs: int,
        extra: list[str],
        storage: str | None = None,
        tail_dir: Path | None = None,
    ) -> None:
        self.res = Result(name, what, seed)
        self.r = rng(seed)
        self.cluster, self.data, self.epochs = cluster, data, epochs
        self.storage = storage or str(tmp / "runs")
        self.run_dir = Path(self.storage) / name if tail_dir is None else tail_dir
        self.tail = StepTail(self.run_dir)
        logs = REPORT_DIR / "logs"  # kept with the report (pytest's temp dirs are rotated away)
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name}.log").unlink(missing_ok=True)
        self.driver = Driver(
            cluster, run_args(data, self.storage, name, epochs, *extra), logs / f"{name}.log"
        )
        self.t0 = time.time()

    def start(self) -> Scenario:
        self.tail.start()
        self.driver.start()
        return self

    def fault(self, kind: str, detail: str = "") -> Fault:
        f = Fault(kind, time.time(), detail, self.tail.last_step())
        self.res.faults.append(f)
        return f

    def finish(
        self, reference: Path | None = None, timeout: float = 300, run_dir: Path | None = None
    ) -> Result:
        rc = self.driver.wait(timeout)
        self.tail.stop()
        assert rc == 0, self.driver.output()[-5000:]
        self.res.wall_s = round(time.time() - self.t0, 1)
        analyse(self.res, run_dir or self.run_dir, self.data, self.epochs, self.tail, reference)
        out = self.driver.output()
        for line in out.splitlines():  # how long each hand-off waited for the preempted node to go
            if "preemption hand-off" in line and "left" in line:
                self.res.notes.append(line.split("ray_mmd.train: ", 1)[-1].split("; notice")[0])
        write_report(self.res)
        return self.res

    def victim(self, n_workers: int) -> tuple[int, object]:
        """A seeded choice among the live train worker processes: (pid, node)."""
        workers = self.cluster.wait_train_workers(n_workers)
        pid = self.r.choice(sorted(workers))
        return pid, workers[pid]

    def jit_checkpoints(self, since: float) -> list[float]:
        """Seconds from `since` (the notice was issued) to each verified preemption checkpoint after it."""
        return [
            round(x["time"] - since, 2)
            for x in self.tail.lines
            if x["kind"] == "preemption" and "preempt/checkpoint_s" in x and x["time"] > since
        ]
