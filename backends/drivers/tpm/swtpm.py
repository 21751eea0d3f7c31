"""One swtpm per vTPM, asyncio-friendly: started and stopped by PID, TPM commands over its unix data socket,
control commands (locality, cancel, init, shutdown) over its control socket.  Knows no tpmif.

swtpm runs `--daemon` with a pid file in the vTPM's run directory, so it is not this process's child: a pidfd
tells the event loop when it exits (no waitpid thread per TPM), and a daemon that restarts finds it by the pid
file and adopts it (its volatile state: loaded keys, sessions, PCRs survive a daemon restart).

Facts this relies on (swtpm 0.7.1, Debian 12):
- The data socket takes raw TPM commands (tag u16, size u32 ...), one at a time, and answers each in kind.
- The control socket takes `u32 code || payload` per connection and answers `u32 result || payload`;
  CMD_GET_CAPABILITY answers 8 bytes (a 64-bit mask).  While a TPM command runs, the control socket is not
  served: a CANCEL is answered only when the command ends, and libtpms 0.9 does not abort key generation on
  it.  So a cancel never waits on the caller's path (tpmif answers a cancelled command with IDLE anyway).
- `--locality reject-locality-4,allow-set-locality`: CMD_SET_LOCALITY 4 is refused (0x3d) by swtpm too.
- `swtpm_setup` creates the EK and its certificate offline in about 1.5 s, with a local CA whose directory
  is given in a private configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pvback.swtpm")

CMD_GET_CAPABILITY = 0x01
CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_SET_LOCALITY = 0x05
CMD_CANCEL_TPM_CMD = 0x09

TPM2_STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")
TPM12_STARTUP_CLEAR = bytes.fromhex("00c10000000c000000990001")
TPM2_RC_INITIALIZE = 0x100  # already started
TPM12_INVALID_POSTINIT = 0x26

MAX_RESPONSE = 64 * 1024
START_TIMEOUT_S = 5.0


class SwtpmError(Exception):
    """swtpm could not be set up, started or reached, or broke its framing."""


@dataclass(frozen=True)
class SwtpmPaths:
    """Where one vTPM lives: its state (persistent, 0700) and its sockets and pid file (runtime, 0700)."""

    state_dir: Path
    run_dir: Path

    @property
    def sock(self) -> Path:
        return self.run_dir / "swtpm.sock"

    @property
    def ctrl(self) -> Path:
        # <data>.ctrl: where tpm2-tss's swtpm TCTI looks for it, handy for an operator's tpm2_* by hand.
        return self.run_dir / "swtpm.sock.ctrl"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "swtpm.pid"

    @property
    def log(self) -> Path:
        return self.run_dir / "swtpm.log"


def _state_file(state_dir: Path, tpm2: bool) -> Path:
    return state_dir / ("tpm2-00.permall" if tpm2 else "tpm-00.permall")


def key_pipe(data: bytes | bytearray) -> int:
    """The read end of a pipe that holds `data` and is closed for writing: how a key reaches swtpm and
    swtpm_setup (`fd=N`), never through a command line, the environment or a file.  The caller closes it."""
    if len(data) > 4096:  # one write into an empty pipe never blocks below PIPE_BUF
        raise ValueError("key material larger than a pipe's atomic write")
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(w, data)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


async def _run(argv: list[str], timeout: float, pass_fds: tuple[int, ...] = ()) -> tuple[int, str]:
    # A session of its own: swtpm_setup runs a swtpm child that holds the state's lock, and on a timeout or a
    # cancel the whole group must go (killing swtpm_setup alone left that child locking the state).
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=pass_fds,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True)

    async def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        await kill_group()
        raise SwtpmError(f"{argv[0]} did not finish in {timeout} s") from None
    except asyncio.CancelledError:  # the device went away while swtpm_setup ran: it goes too
        await kill_group()
        raise
    return int(proc.returncode or 0), out.decode(errors="replace")


_CAPS: dict[str, frozenset[str]] = {}


async def capabilities(swtpm_bin: str = "swtpm") -> frozenset[str]:
    """`swtpm socket --print-capabilities` features (cached per binary)."""
    if swtpm_bin not in _CAPS:
        try:
            rc, out = await _run([swtpm_bin, "socket", "--print-capabilities"], 10.0)
        except FileNotFoundError:
            raise SwtpmError(f"{swtpm_bin} not found: install swtpm") from None
        if rc != 0:
            raise SwtpmError(f"{swtpm_bin} --print-capabilities failed ({rc}): {out.strip()[:200]}")
        try:
            _CAPS[swtpm_bin] = frozenset(str(f) for f in json.loads(out)["features"])
        except (ValueError, KeyError, TypeError):
            raise SwtpmError(f"{swtpm_bin} --print-capabilities said {out.strip()[:200]!r}") from None
    return _CAPS[swtpm_bin]


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one: two vTPMs set up at once may both write the CA config
    while the first one's swtpm_setup already reads it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def private_setup_config(ca_dir: Path) -> Path:
    """A swtpm_setup configuration whose local CA lives in `ca_dir` (0700) instead of /var/lib/swtpm-localca."""
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    localca = ca_dir / "swtpm-localca.conf"
    setup = ca_dir / "swtpm_setup.conf"
    if not setup.exists():
        _write_atomically(localca, f"statedir = {ca_dir}\nsigningkey = {ca_dir}/signkey.pem\n"
                                   f"issuercert = {ca_dir}/issuercert.pem\ncertserial = {ca_dir}/certserial\n")
        options = ca_dir / "swtpm-localca.options"
        _write_atomically(options,
                          "--platform-manufacturer pvback\n--platform-version 1.0\n--platform-model pvback-vtpm\n")
        # Last: its presence says the other two are complete.
        _write_atomically(setup, f"create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {localca}\n"
                                 f"create_certs_tool_options = {options}\nactive_pcr_banks = sha256\n")
    return setup


async def ensure_state(state_dir: Path, *, tpm2: bool, vmid: str, setup_config: Path | None,
                       swtpm_setup: str = "swtpm_setup", timeout: float = 300.0,
                       key: bytes | bytearray | None = None, must_exist: bool = False) -> bool:
    """Create the vTPM's state (EK, EK and platform certificates, locked NV) unless it exists; True if created.
    Never overwrites: an existing state is the guest's and is kept whatever happens.  With `key` (32 bytes)
    the state is encrypted from its first byte (swtpm refuses a plaintext state once started with a key).
    `must_exist`: the state is known to have been created, so a missing one is an error, not a new vTPM."""
    if _state_file(state_dir, tpm2).exists():
        return False
    if must_exist:
        raise SwtpmError(f"the state {_state_file(state_dir, tpm2)} is missing although this vTPM was created: "
                         "refusing to make a fresh TPM in its place (restore the state from a backup)")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    argv = [swtpm_setup, *(["--tpm2"] if tpm2 else []), "--tpm-state", str(state_dir), "--vmid", vmid,
            "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite",
            "--logfile", str(state_dir / "setup.log")]
    if setup_config is not None:
        argv += ["--config", str(setup_config)]
    fds: tuple[int, ...] = ()
    if key is not None:
        # swtpm_setup reads the key as hex text from the fd and hands it to the swtpm it runs by fd again.
        hexkey = bytearray(key.hex().encode())
        try:
            fds = (key_pipe(hexkey),)
        finally:
            hexkey[:] = bytes(len(hexkey))
        argv += ["--keyfile-fd", str(fds[0]), "--cipher", "aes-256-cbc"]
    try:
        rc, out = await _run(argv, timeout, fds)
    except FileNotFoundError:
        raise SwtpmError(f"{swtpm_setup} not found: install swtpm-tools") from None
    finally:
        for fd in fds:
            os.close(fd)
    if rc != 0 or not _state_file(state_dir, tpm2).exists():
        tail = ""
        with contextlib.suppress(OSError):
            tail = (state_dir / "setup.log").read_text(errors="replace")[-300:]
        raise SwtpmError(f"swtpm_setup failed ({rc}): {(out.strip() or tail)[-300:]}")
    return True


def _proc_cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


class Swtpm:
    """One swtpm process for one vTPM.  Methods are coroutines and never block the loop; one TPM command at a
    time (the caller's contract, as tpmif's)."""

    def __init__(self, paths: SwtpmPaths, *, tpm2: bool = True, swtpm_bin: str = "swtpm",
                 on_exit: Callable[[Swtpm], None] | None = None) -> None:
        self.paths = paths
        self.tpm2 = tpm2
        self.swtpm_bin = swtpm_bin
        self.on_exit = on_exit
        self.pid: int | None = None
        self.adopted = False  # found running (a previous daemon started it)
        self._pidfd = -1
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self.exited = asyncio.Event()

    # -- lifetime -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.pid is not None and not self.exited.is_set()

    async def start(self, key: bytes | bytearray | None = None) -> None:
        """Adopt the swtpm a previous daemon left running for this vTPM, else start one.  `key`: the state's
        AES-256 key, handed over through a pipe (`--key fd=N`); swtpm exits at once if it does not decrypt
        the state, which is then left as it was."""
        self.paths.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.paths.run_dir, 0o700)
        if await self._adopt():
            return
        for p in (self.paths.sock, self.paths.ctrl, self.paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        argv = [self.swtpm_bin, "socket", *(["--tpm2"] if self.tpm2 else []),
                "--server", f"type=unixio,path={self.paths.sock},mode=0600",
                "--ctrl", f"type=unixio,path={self.paths.ctrl},mode=0600",
                "--tpmstate", f"dir={self.paths.state_dir},mode=0600",
                "--flags", "not-need-init,startup-clear",
                "--locality", "reject-locality-4,allow-set-locality",
                "--pid", f"file={self.paths.pidfile}",
                "--log", f"file={self.paths.log}",
                "--daemon"]
        fds: tuple[int, ...] = ()
        if key is not None:
            fds = (key_pipe(key),)
            argv += ["--key", f"fd={fds[0]},mode=aes-256-cbc,format=binary"]
        # Its output goes to a file: a pipe would stay open in the daemonized child.
        out_path = self.paths.run_dir / "swtpm.out"
        try:
            with open(out_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                            stderr=asyncio.subprocess.STDOUT, pass_fds=fds)
        except FileNotFoundError:
            raise SwtpmError(f"{self.swtpm_bin} not found: install swtpm") from None
        finally:
            for fd in fds:
                os.close(fd)
        try:
            rc = await asyncio.wait_for(proc.wait(), START_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise SwtpmError(f"swtpm did not daemonize in {START_TIMEOUT_S} s") from None
        if rc != 0:
            text = out_path.read_text(errors="replace")[-300:].strip()
            raise SwtpmError(f"swtpm did not start ({rc}): {text or self._log_tail()}")
        pid = self._read_pidfile()
        if pid is None:
            raise SwtpmError(f"swtpm wrote no pid file: {self._log_tail()}")
        self._watch(pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the sockets exist once it daemonized; answering the control socket means serving
            try:
                await self.get_capability(timeout=1.0)
                break
            except (OSError, SwtpmError):
                if self.exited.is_set() or time.monotonic() > deadline:
                    await self.stop(graceful=False)
                    raise SwtpmError(f"swtpm pid {pid} is not answering: {self._log_tail()}") from None
                await asyncio.sleep(0.02)
        log.info("swtpm started", extra={"pid": pid, "dir": str(self.paths.run_dir)})

    async def stop_leftover(self) -> bool:
        """Stop (gracefully: its state is saved) a swtpm a previous daemon left running for this vTPM, when
        this one is not going to serve it (its key is no longer released).  True if there was one."""
        if self.running or not await self._adopt():
            return False
        await self.stop(graceful=True)
        self.adopted = False
        return True

    async def _adopt(self) -> bool:
        pid = self._read_pidfile()
        if pid is None:
            return False
        cmd = _proc_cmdline(pid)
        ctrl_arg = f"type=unixio,path={self.paths.ctrl},mode=0600".encode()
        if not cmd or not cmd[0].endswith(b"swtpm") or ctrl_arg not in cmd:
            return False
        try:
            self._watch(pid)
        except ProcessLookupError:
            return False
        try:
            # Up to a command's length: it may still be running the command its old daemon sent.
            await self.get_capability(timeout=30.0)
        except (OSError, SwtpmError):
            await self.stop(graceful=False)
            return False
        self.adopted = True
        log.info("swtpm adopted", extra={"pid": pid, "dir": str(self.paths.run_dir)})
        return True

    def _read_pidfile(self) -> int | None:
        try:
            text = self.paths.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _log_tail(self) -> str:
        try:
            return self.paths.log.read_text(errors="replace")[-300:].strip()
        except OSError:
            return "(no log)"

    def _watch(self, pid: int) -> None:
        self._pidfd = os.pidfd_open(pid)
        self.pid = pid
        self.exited.clear()
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        self._unwatch()
        self.exited.set()
        self._drop_data()
        if not self._stopping:
            log.warning("swtpm exited", extra={"pid": self.pid, "log": self._log_tail()[-200:]})
            if self.on_exit is not None:
                self.on_exit(self)

    def _unwatch(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _signal(self, sig: int) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """CMD_SHUTDOWN (swtpm saves its state and exits; `swtpm_ioctl -s`), then SIGTERM, then SIGKILL, by
        pidfd.  Idempotent."""
        if self.pid is None or self.exited.is_set():
            self._unwatch()
            return
        self._stopping = True
        self._drop_data()
        try:
            if graceful:
                with contextlib.suppress(OSError, SwtpmError):
                    await self.ctrl(CMD_SHUTDOWN, timeout=timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.exited.wait(), timeout)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if self.exited.is_set():
                    break
                self._signal(sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.exited.wait(), timeout)
        finally:
            self._unwatch()
            self._stopping = False

    def release(self) -> None:
        """Let go without stopping it (the daemon restarts; the next one adopts it)."""
        self._drop_data()
        self._stopping = True
        self._unwatch()

    def kill_for_test(self) -> None:
        self._signal(signal.SIGKILL)

    # -- control channel ------------------------------------------------------------------------------------

    async def ctrl(self, code: int, payload: bytes = b"", *, timeout: float = 5.0) -> bytes:
        """One control command; returns the answer after the result word (SwtpmError if it is non-zero)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(self.paths.ctrl))
            try:
                writer.write(struct.pack(">I", code) + payload)
                await writer.drain()
                answer = await reader.read(256)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if code == CMD_GET_CAPABILITY:
            if len(answer) != 8:
                raise SwtpmError(f"GET_CAPABILITY answered {len(answer)} bytes")
            return answer
        if len(answer) < 4:
            raise SwtpmError(f"control command {code} answered {len(answer)} bytes")
        result = struct.unpack_from(">I", answer)[0]
        if result != 0:
            raise SwtpmError(f"control command {code} failed with {result:#x}")
        return answer[4:]

    async def get_capability(self, *, timeout: float = 5.0) -> int:
        return int(struct.unpack(">Q", await self.ctrl(CMD_GET_CAPABILITY, timeout=timeout))[0])

    async def set_locality(self, locality: int, *, timeout: float = 5.0) -> None:
        await self.ctrl(CMD_SET_LOCALITY, bytes([locality]), timeout=timeout)

    async def cancel(self, *, timeout: float = 300.0) -> None:
        """Answered only once the running command ends (swtpm 0.7.1): run it beside the command."""
        await self.ctrl(CMD_CANCEL_TPM_CMD, timeout=timeout)

    async def reset(self, *, timeout: float = 10.0) -> None:
        """A TPM reset as at a machine's reboot: CMD_INIT (volatile state dropped, NV kept), locality 0, then
        Startup(CLEAR).  The locality is 0 afterwards."""
        self._drop_data()
        await self.ctrl(CMD_INIT, struct.pack(">I", 0), timeout=timeout)
        await self.set_locality(0, timeout=timeout)  # Startup is refused at localities 1-2 (TPM_RC_LOCALITY)
        try:
            rsp = await self.command(TPM2_STARTUP_CLEAR if self.tpm2 else TPM12_STARTUP_CLEAR, timeout=timeout)
        finally:
            self._drop_data()  # swtpm serves one data client at a time: leave it free for the guest's link
        rc = struct.unpack_from(">I", rsp, 6)[0]
        if rc not in (0, TPM2_RC_INITIALIZE if self.tpm2 else TPM12_INVALID_POSTINIT):
            raise SwtpmError(f"Startup after reset answered {rc:#x}")

    # -- data channel ---------------------------------------------------------------------------------------

    def _drop_data(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def command(self, data: bytes, *, timeout: float) -> bytes:
        """Send one TPM command and return its answer.  On a timeout or any error the connection is dropped
        (swtpm may still be running the command; its late answer goes nowhere) and the error raised."""
        try:
            async with asyncio.timeout(timeout):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_unix_connection(str(self.paths.sock))
                assert self._reader is not None
                self._writer.write(data)
                await self._writer.drain()
                head = await self._reader.readexactly(6)
                size = struct.unpack_from(">I", head, 2)[0]
                if not 10 <= size <= MAX_RESPONSE:
                    raise SwtpmError(f"swtpm answered a size of {size}")
                return head + await self._reader.readexactly(size - 6)
        except BaseException:
            self._drop_data()
            raise


def is_gone(exc: BaseException) -> bool:
    """The error says swtpm is not there (as opposed to a slow answer)."""
    return isinstance(exc, (ConnectionError, FileNotFoundError, asyncio.IncompleteReadError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EPIPE))
