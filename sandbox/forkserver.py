"""The fork server: one single-threaded process, with the sandbox preloaded, that forks workers.

Spawning `python` and importing RestrictedPython costs ~70 ms; forking a process that already
did costs ~2 ms. So the front end starts this once (`python -I -m sandbox.forkserver`, empty
environment, no secrets, none of the front end's memory) and asks it for workers.

Control channel: a SOCK_SEQPACKET socket on fd 0 (message boundaries for free, and it can
carry descriptors). Front end -> fork server, one JSON object per message:
    {"op": "configure", "workdir": "...", "plan": {...}}   once, first: how to confine
    {"op": "spawn"}                                         one new generic worker
Fork server -> front end:
    {"op": "spawned", "pid": N}  + SCM_RIGHTS [worker socket, pidfd]
    {"op": "exited", "pid": N, "status": S}    (S < 0: killed by signal -S)
    {"op": "spawn_failed", "error": "..."}     fork or a descriptor failed; this process lives on

A worker is forked, confined (sandbox.confine: every layer the front end asks for, applied
before the worker reads a byte of any val), and then waits, generic, for its `load` frame on
its own socket: `sandbox.worker.serve` does the rest. The pidfd lets the front end kill
exactly that process, with no pid-reuse race, though it is not the worker's parent; this
process reaps the worker and reports how it ended.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import select
import shutil
import signal
import socket
import sys

# Everything a worker will need is imported here, before any fork, so children share it
# copy-on-write and never import after they are confined (they could not read the files).
import sandbox.worker
from sandbox.confine import ConfineError, ConfinePlan, confine
from sandbox.errors import BadMessageError
from sandbox.http import Request, to_response
from sandbox.limits import SERVING_NICE
from sandbox.messages import HttpResponse
from sandbox.policy import LogBuffer, load_val
from sandbox.wire import encode_frame

MAX_MESSAGE_BYTES = 65536


class ForkServer:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.workdir = ""
        self.plan: ConfinePlan | None = None
        self.spawned = 0
        self.children: dict[int, str] = {}  # pid -> its private working directory

    def serve(self) -> None:
        # SIGCHLD wakes the select loop through a pipe (signal.set_wakeup_fd), so exits are
        # reaped and reported promptly even while no spawn request arrives.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        while True:
            ready, _, _ = select.select([self.control.fileno(), wake_r], [], [])
            if wake_r in ready:
                while _drain(wake_r):
                    pass
                self.reap()
            if self.control.fileno() in ready:
                message = self.control.recv(MAX_MESSAGE_BYTES)
                if not message:
                    return  # the front end is gone: so are we (workers follow: sandbox.tether)
                self.handle(json.loads(message))

    def handle(self, message: dict[str, object]) -> None:
        op = message.get("op")
        if op == "configure":
            workdir, plan = message.get("workdir"), message.get("plan")
            if not isinstance(workdir, str) or not isinstance(plan, dict):
                raise BadMessageError("configure needs a workdir and a plan")
            self.workdir = workdir
            # Checked once, here; each worker gets a copy with its own workdir and socket.
            self.plan = ConfinePlan(
                workdir=workdir,
                memory_mb=int(plan["memory_mb"]),
                cpu_time_s=int(plan["cpu_time_s"]),
                open_files=int(plan["open_files"]),
                drop_to_uid=plan["drop_to_uid"]
                if plan["drop_to_uid"] is None
                else int(plan["drop_to_uid"]),
                layers=frozenset(str(layer) for layer in plan["layers"]),
            )
        elif op == "spawn":
            self.spawn()
        else:
            raise BadMessageError(f"unknown op {op!r}")

    def spawn(self) -> None:
        if self.plan is None:
            raise BadMessageError("spawn before configure")
        try:
            self._spawn(self.plan)
        except OSError as exc:
            # EAGAIN at the process limit (a cgroup's pids.max, RLIMIT_NPROC), EMFILE/ENFILE:
            # a reason to answer "not now", never to die and take every worker along.
            failed = {"op": "spawn_failed", "error": f"{exc.strerror or exc}"}
            self.control.send(json.dumps(failed).encode())

    def _spawn(self, plan: ConfinePlan) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.spawned += 1
        # Not created here: confine() makes it, empty, 0700, owned by the user it drops to.
        cwd = os.path.join(self.workdir, f"w{os.getpid()}-{self.spawned}")
        try:
            pid = os.fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                parent_end.close()
                self.control.close()
                code = run_worker(child_end, cwd, plan)
            finally:
                os._exit(code)
        child_end.close()
        self.children[pid] = cwd
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            parent_end.close()  # the worker reads EOF and exits; reap() reports it
            raise
        try:
            payload = json.dumps({"op": "spawned", "pid": pid}).encode()
            socket.send_fds(self.control, [payload], [parent_end.fileno(), pidfd])
        finally:
            os.close(pidfd)
            parent_end.close()

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            shutil.rmtree(self.children.pop(pid, ""), ignore_errors=True)
            code = os.waitstatus_to_exitcode(status)
            self.control.send(json.dumps({"op": "exited", "pid": pid, "status": code}).encode())


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


CONFINE_FAILED = 70  # EX_SOFTWARE: the worker could not be confined and ran nothing

# Run once by each generic worker while it waits: the first request through a freshly forked
# process pays page faults for every copy-on-write page it touches (RestrictedPython, the
# guards, json). Paying them here, before any val is known, takes them off the cold path.
_WARM_UP_VAL = """
import json
def warm(req):
    total = sum(x * 2 for x in range(10)) + len(req.query.get("q", ""))
    return Response.json({"ok": json.loads("[1]"), "total": total, "path": req.path})
"""


def _warm_up() -> None:
    log = LogBuffer(1024)
    val = load_val(_WARM_UP_VAL, "warm", {}, log)
    request = Request("GET", "http://warm/", "/", "q=1", [("host", "warm")], b"")
    response = to_response(val.export(request))  # type: ignore[operator]
    headers = tuple((name, value) for name, value in response.header_pairs())
    encode_frame(HttpResponse(0, response.status, headers, response.body).to_frame())
    log.take()


def run_worker(sock: socket.socket, cwd: str, plan: ConfinePlan) -> int:
    """In the forked child: confine, then become a worker on `sock`. Returns the exit code."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # No parent-death signal: a worker is supervised by the front end, not by this process.
    # If this process dies, its workers finish their requests for the front end, which
    # still holds their pidfds (to kill them at their wall time) and reaps them as their
    # subreaper. If the front end dies, each worker ends at its socket's hang-up, even
    # mid-val (sandbox.tether).
    fd = sock.fileno()
    try:
        confine(dataclasses.replace(plan, workdir=cwd, keep_fds=(fd, 2)))
    except (ConfineError, ValueError, OSError) as exc:
        print(f"valrun worker: not confined, so not serving: {exc}", file=sys.stderr)
        return CONFINE_FAILED
    _warm_up()
    fd = sock.detach()
    inp = os.fdopen(fd, "rb", buffering=0)
    out = os.fdopen(os.dup(fd), "wb")
    try:
        return sandbox.worker.serve(inp, out, confined=True, tethered=True)
    except Exception as exc:  # a protocol violation by the front end: say so, exit non-zero
        print(f"valrun worker: {exc}", file=sys.stderr)
        return 2


def main() -> int:
    # Not PR_SET_PDEATHSIG here: it fires when the parent *thread* exits, and trio starts
    # processes from pooled threads that retire after ~10 s idle. The fork server ends at
    # its control socket's EOF instead, which the front end's death (or close) brings.
    # Forking and confining spare workers is background work: below the front end, like the
    # workers themselves (sandbox.limits.SERVING_NICE). Going lower (19) for idle workers
    # would need RLIMIT_NICE raised to come back, which needs CAP_SYS_RESOURCE.
    os.setpriority(os.PRIO_PROCESS, 0, SERVING_NICE)
    control = socket.socket(fileno=0)
    # The warm-up once here too: what it builds lazily (compiled regexes, caches, interned
    # names, the policy's first compile) is then made once, shared by every child, instead of
    # once per worker in pages of its own.
    _warm_up()
    # Objects that exist now are shared with every child; freezing them keeps the GC from
    # touching (and so copying) their pages in each child.
    gc.freeze()
    ForkServer(control).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
