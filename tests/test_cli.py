"""The command line on a real guest: exit statuses and one-line reasons, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from pykvmm.vmm import abi, loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pykvmm(*args, timeout=60, prefix=()):
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
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, preexec_fn=_nofile(64))
    assert res.returncode == 0, res.stderr


def test_open_file_limit_exit_5_names_the_limit(kvm_available):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hello", "--vcpus", "16", "--planes", "2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, preexec_fn=_nofile(30))
    assert_clean_error(res, 5, "EMFILE", "may open 30 files (ulimit -n)")
