"""The command line on a real guest: exit statuses and one-line reasons, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from pykvmm.vmm import abi, loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pykvmm(*args, timeout=600, prefix=()):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([*prefix, sys.executable, "-m", "pykvmm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def assert_clean_error(res, status, *phrases):
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    for p in phrases:
        assert p in res.stderr, res.stderr


def guest(name):
    return str(loader.bundled_guest(name))


def test_run_hello(kvm_available):
    res = pykvmm("run", guest("hello"))
    assert res.returncode == 0, res.stderr
    assert "hello from vCPU 0 plane 0" in res.stdout
    assert "done after" in res.stderr


def test_run_bundled_guest_by_name(kvm_available):
    assert pykvmm("run", "hello", "--vcpus", "2").returncode == 0


def test_assertion_failure_exit_1(kvm_available):
    res = pykvmm("run", guest("assert_fail"))
    assert_clean_error(res, 1, "assertion failed", "one is not two", "0x1", "0x2")


def test_crash_exit_3_shows_registers_and_code(kvm_available):
    res = pykvmm("run", guest("fault"))
    assert_clean_error(res, 3, "triple fault", "RAX=000000000000fa17", "=> ", "ud2")


def test_timeout_exit_4_says_where(kvm_available):
    res = pykvmm("run", guest("hang"), "--timeout", "0.5")
    assert_clean_error(res, 4, "timed out", "vCPU 0 plane 0: RIP=", "jmp")


@pytest.mark.parametrize("make_input, phrase", [
    (lambda d: str(d / "missing.bin"), "does not exist"),
    (lambda d: _write(d / "empty.bin", b""), "is empty"),
    (lambda d: str(d), "is a directory"),
    (lambda d: _write(d / "big.bin", b"\x90" * (abi.GUEST_MAX_SIZE + 1)), "the most pykvmm loads"),
])
def test_bad_guest_file_exit_2(tmp_path, make_input, phrase):
    assert_clean_error(pykvmm("run", make_input(tmp_path)), 2, phrase)


def test_unreadable_guest_exit_2(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop root from reading")
    p = tmp_path / "secret.bin"
    p.write_bytes(b"\xf4")
    p.chmod(0)
    assert_clean_error(pykvmm("run", str(p)), 2, "permission denied")


@pytest.mark.parametrize("value", ["0", "17", "-1", "two"])
def test_bad_planes_exit_2(value):
    res = pykvmm("run", guest("hello"), "--planes", value)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--planes" in res.stderr


@pytest.mark.parametrize("value", ["0", "65", "x"])
def test_bad_vcpus_exit_2(value):
    res = pykvmm("run", guest("hello"), "--vcpus", value)
    assert res.returncode == 2 and "--vcpus" in res.stderr and "Traceback" not in res.stderr


def test_no_kvm_device_exit_5():
    assert_clean_error(pykvmm("run", guest("hello"), "--kvm-device", "/nonexistent/kvm"), 5,
                       "does not exist", "--kvm-device")


def test_not_a_kvm_device_exit_5():
    assert_clean_error(pykvmm("run", guest("hello"), "--kvm-device", "/dev/null"), 5, "not a KVM device")


def test_no_permission_exit_5(tmp_path, kvm_available):
    """A KVM device node the user cannot open (mode 000; as root, without DAC override)."""
    import shutil
    import stat
    node = tmp_path / "kvm"
    st = os.stat("/dev/kvm")
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop DAC override")
        os.mknod(node, stat.S_IFCHR | 0o000, st.st_rdev)
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    elif os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("not root (cannot make a device node) and /dev/kvm is accessible to this user")
    else:
        node = "/dev/kvm"
    assert_clean_error(pykvmm("run", guest("hello"), "--kvm-device", str(node), prefix=prefix), 5,
                       "no permission", "run as root or join group 'kvm'")


def test_caps_json(kvm_available):
    res = pykvmm("caps", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    backends = {b["backend"]: b for b in info["backends"]}
    assert backends["multivm"]["available"]
    assert info["auto"]["backend"] in backends
    transports = {t["name"]: t for t in info["transports"]}
    assert transports["port"]["works"]


def test_python_dash_m_and_help():
    res = pykvmm("--help")
    assert res.returncode == 0 and "run" in res.stdout and "caps" in res.stdout


def _nofile(n):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_open_file_limit_fits_one_fd_per_vcpu(kvm_available):
    """16 vCPUs x 2 planes under `ulimit -n 64`: one fd per KVM vCPU (Python's mmap kept a
    duplicate of each: EMFILE)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hello", "--vcpus", "16", "--planes", "2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, preexec_fn=_nofile(64))
    assert res.returncode == 0, res.stderr


def test_open_file_limit_exit_5_names_the_limit(kvm_available):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hello", "--vcpus", "16", "--planes", "2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, preexec_fn=_nofile(30))
    assert_clean_error(res, 5, "EMFILE", "may open 30 files (ulimit -n)")


def _fifo(d):
    path = d / "fifo"
    os.mkfifo(path)
    return str(path)


def _too_much_memory():
    from pykvmm.vmm.memory import host_memory_available
    mib = ((host_memory_available() >> 20) + 2048) & ~1
    if mib > 65536:
        pytest.skip(f"this host can give more than --mem allows ({mib} MiB)")
    return str(mib)


# The bad-input matrix: everything a user can type or point at gets a one-line reason and the
# documented status, never a traceback (issue 15, item 6).
@pytest.mark.parametrize("make_args, status, phrase", [
    (lambda d: ["run", "hello", "--timeout", "inf"], 2, "is not a number of seconds in (0, 2592000]"),
    (lambda d: ["run", "hello", "--timeout", "nan"], 2, "is not a number of seconds"),
    (lambda d: ["run", "hello", "--timeout", "1e10"], 2, "is not a number of seconds"),
    (lambda d: ["run", "hello", "--timeout", "0"], 2, "is not a number of seconds"),
    (lambda d: ["run", "hello", "--timeout", "soon"], 2, "'soon' is not a number of seconds"),
    (lambda d: ["run", "hello", "--mem", "33"], 2, "must be a multiple of 2"),
    (lambda d: ["run", "hello", "--mem", "65538"], 2, "--mem"),
    (lambda d: ["run", "hello", "--mem", _too_much_memory()], 2, "more than this host can give now"),
    (lambda d: ["run", "/dev/zero"], 2, "/dev/zero is not a regular file"),
    (lambda d: ["run", "/dev/urandom"], 2, "/dev/urandom is not a regular file"),
    (lambda d: ["run", _fifo(d)], 2, "is not a regular file (a device, FIFO or socket)"),
    (lambda d: ["run", "hello", "--gdb", _write(d / "plain", b"x")], 2, "exists and is not a unix socket"),
    (lambda d: ["trace", "summary", _fifo(d)], 2, "is not a regular file"),
    (lambda d: ["trace", "summary", _write(d / "t.json", b"[1,2,3]")], 2, "not one written by pykvmm"),
    (lambda d: ["trace", "summary", _write(d / "t.json", b'{"traceEvents":5}')], 2, "must be a list of events"),
    (lambda d: ["trace", "summary", _write(d / "t.jsonl", b'{"kind":"exit"}\n')], 2, "needs 'ts' and 'kind'"),
    (lambda d: ["trace", "summary", _write(d / "t.jsonl", b'{"kind":"exit","ts":"1"}\n')], 2,
     "'ts' must be a finite number"),
    (lambda d: ["trace", "summary", _write(d / "t.jsonl", b'{"kind":"exit","ts":1,"vcpu":[0]}\n')], 2,
     "'vcpu' must be an integer"),
    (lambda d: ["trace", "summary", _write(d / "t.json", b"[" * 100_000)], 2, "nested too deeply"),
    (lambda d: ["trace", "summary", _write(d / "t.jsonl", b"\xff\xfe\n")], 2, "codec can't decode"),
])
def test_bad_input_matrix(tmp_path, make_args, status, phrase):
    res = pykvmm(*make_args(tmp_path))
    assert_clean_error(res, status, phrase)
    assert [line for line in res.stderr.splitlines() if phrase in line]     # said on one line


def test_gdb_socket_of_a_live_run_is_not_taken(kvm_available, tmp_path):
    """Two runs given one --gdb unix socket: the second unlinked the first's live socket."""
    sock = tmp_path / "gdb.sock"
    env = dict(os.environ, PYTHONPATH=ROOT)
    first = subprocess.Popen([sys.executable, "-m", "pykvmm", "run", "hello", "--gdb", str(sock)], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from conftest import wait_for
        wait_for(lambda: sock.exists() or first.poll() is not None, "the first run's gdb socket")
        assert first.poll() is None, first.stderr.read()
        inode = sock.stat().st_ino
        assert_clean_error(pykvmm("run", "hello", "--gdb", str(sock)), 2, "is in use")
        assert sock.stat().st_ino == inode                   # the first run's socket is untouched
    finally:
        first.terminate()
        first.wait(600)
    assert not sock.exists()                                 # the first run removed its own socket
    res = pykvmm("run", "hello", "--gdb", str(sock), "--timeout", "0.2")   # a leftover is reused
    assert "is in use" not in res.stderr
