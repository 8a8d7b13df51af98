"""A handle on one worker subprocess: spawn it, exchange frames with it, kill it.

The handle knows nothing of vals or HTTP; it moves frames and turns every way a process can
misbehave (EOF, garbage, an oversized frame) into a WorkerError.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import trio

from runtime.errors import WorkerError
from sandbox.wire import Frame, FrameDecoder, FrameTooLargeError, ProtocolError, encode_frame

logger = logging.getLogger(__name__)

# -I: isolated mode, no PYTHON* variables, no user site, no cwd on sys.path.
WORKER_COMMAND = (sys.executable, "-I", "-m", "sandbox.worker")
RECEIVE_CHUNK_BYTES = 65536


class WorkerProcess:
    def __init__(self, process: trio.Process, decoder: FrameDecoder) -> None:
        self.process = process
        self.decoder = decoder
        self.pid = process.pid

    @classmethod
    async def spawn(
        cls,
        *,
        cwd: Path,
        max_body_bytes: int,
        command: tuple[str, ...] = WORKER_COMMAND,
        inherit_stderr: bool = False,
    ) -> WorkerProcess:
        process = await trio.lowlevel.open_process(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A worker's stderr is its own business; inheriting it would let a val flood
            # the service's log.
            stderr=None if inherit_stderr else subprocess.DEVNULL,
            # No secret reaches a worker through its environment (SPEC §8).
            env={},
            cwd=cwd,
        )
        return cls(process, FrameDecoder(max_body_bytes=max_body_bytes))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def send(self, frame: Frame) -> None:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send_all(encode_frame(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise await self._died("while being sent a request") from None

    async def receive(self) -> Frame:
        assert self.process.stdout is not None
        while True:
            try:
                frame = self.decoder.next_frame()
            except FrameTooLargeError as exc:
                kind = "response_too_large" if exc.part == "body" else "protocol_error"
                raise WorkerError(f"the worker sent a {exc}", kind) from None
            except ProtocolError as exc:
                raise WorkerError(
                    f"the worker broke the protocol: {exc}", "protocol_error"
                ) from None
            if frame is not None:
                return frame
            try:
                chunk = await self.process.stdout.receive_some(RECEIVE_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                raise await self._died("before it replied")
            self.decoder.feed(bytes(chunk))

    async def _died(self, when: str) -> WorkerError:
        with trio.move_on_after(1):
            await self.process.wait()
        code = self.process.returncode
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
            if -code == signal.SIGXCPU:  # the soft RLIMIT_CPU the worker armed
                return WorkerError(f"the worker {how} {when}: CPU time limit", "cpu_limit")
        else:
            how = f"exited with status {code}"
        return WorkerError(f"the worker {how} {when}", "worker_crashed")

    def kill(self) -> None:
        if self.alive:
            self.process.kill()

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Ask the worker to exit (EOF on its stdin), then kill it if it does not."""
        assert self.process.stdin is not None
        with trio.move_on_after(grace_s) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError):
                await self.process.stdin.aclose()
            await self.process.wait()
        if scope.cancelled_caught:
            self.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
