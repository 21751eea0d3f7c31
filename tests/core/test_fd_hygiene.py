"""Every fd the daemon makes is close-on-exec.  Python's are by default (PEP 446); the C layer's must say so, and
fds received over a socket must be asked for with MSG_CMSG_CLOEXEC.  uvloop's subprocess_exec does not implement
close_fds: an inheritable fd goes to every child, and swtpm (daemonized, adopted by the next daemon) keeps it
after the daemon is killed.  A tap queue kept that way made a restarted daemon's peer unable to reach its guest
(tests/system/test_net_restart.py).  A source check, so that a path the system tests do not run is held too."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A call that makes an fd; a member call (`gnt.open(...)`, a library's ops table) is the library's business.
_C_MAKERS = re.compile(r"(?<![\w.>])(dup|dup2|pipe|pipe2|eventfd|timerfd_create|signalfd|socket|accept|accept4|open|"
                       r"openat|memfd_create|epoll_create|epoll_create1|inotify_init|inotify_init1|recvmsg)\s*\(")
_C_SAYS = re.compile(r"CLOEXEC")
# socket.recv_fds drops its flags (CPython 3.11): MSG_CMSG_CLOEXEC would never reach the kernel.
_PY_BANNED = re.compile(r"\brecv_fds\s*\(|\bos\.dup2\s*\(.*inheritable\s*=\s*True|\bset_inheritable\s*\([^)]*True")


def c_findings(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "csrc").glob("*.c")):
        text = re.sub(r"/\*.*?\*/", lambda m: " " * len(m.group(0)), path.read_text(), flags=re.S)
        for m in _C_MAKERS.finditer(text):
            stmt = text[m.start():text.find(";", m.start())]
            if not _C_SAYS.search(stmt):
                line = text.count("\n", 0, m.start()) + 1
                out.append(f"{path.relative_to(root)}:{line}: {m.group(1)}() without CLOEXEC")
    return out


def py_findings(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "backends").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _PY_BANNED.search(line.split("#", 1)[0]):
                out.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return out


def test_the_c_layer_and_backends_make_only_close_on_exec_fds() -> None:
    assert c_findings(REPO) == []
    assert py_findings(REPO) == []


def test_a_planted_inheritable_fd_is_caught(tmp_path: Path) -> None:
    (tmp_path / "csrc").mkdir()
    (tmp_path / "backends").mkdir()
    (tmp_path / "csrc" / "x.c").write_text(
        "/* dup( in a comment is fine */\n"
        "int a(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }\n"
        "int b(int fd) { return dup(fd); }\n"
        "int c(void) { return eventfd(0,\n    EFD_NONBLOCK); }\n"
        "int d(struct lib *l) { return l->open(0) + l2.open(0); }\n")
    (tmp_path / "backends" / "y.py").write_text(
        "import socket\n"
        "data, fds, _f, _a = socket.recv_fds(s, 1, 1, socket.MSG_CMSG_CLOEXEC)\n"
        "# socket.recv_fds( in a comment is fine\n")
    assert c_findings(tmp_path) == ["csrc/x.c:3: dup() without CLOEXEC", "csrc/x.c:4: eventfd() without CLOEXEC"]
    assert py_findings(tmp_path) == ["backends/y.py:2: data, fds, _f, _a = socket.recv_fds(s, 1, 1, "
                                     "socket.MSG_CMSG_CLOEXEC)"]
