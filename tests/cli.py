"""The project's command lines run as `python SCRIPT ARGS` runs them, without paying each time for the
seconds a new interpreter spends importing torch and torchvision.

`run(argv, cwd, env, timeout)` returns what subprocess.run(..., capture_output=True, text=True) returns,
and raises subprocess.TimeoutExpired as it does. The command goes to a server: a plain `python
tests/cli.py` (a child of the test process, not the test process itself) started with the command's
environment, which imports the heavy third-party libraries once (LIBRARIES) and then forks a child per
command. The child takes the command's working directory, environment and argv, reads /dev/null and
writes to two files (file descriptors 0, 1 and 2), sets sys.path[0] to the script's folder, drops every
module of this repository from sys.modules (so they are imported afresh and read the command's
environment, as in a new process) and runs the script as __main__ with the interpreter's handling of
SystemExit and uncaught exceptions. Whatever the libraries printed while the server imported them is
put in front of each command's output, where a new process would print it.

A server serves the commands whose environment equals its own apart from the project's FAIRDIFF_*
variables (which only the project's modules read) and pytest's PYTEST_* (which names the running test);
another environment gets a server of its own.

`fresh(...)` runs a command in a real subprocess: tests/test_cli.py checks that both give the same.

    python tests/cli.py --serve      # the server: JSON requests on stdin, JSON replies on stdout
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN_FOLDERS = (REPO, REPO / "tests", REPO / "notebooks")   # the project's modules (not a virtualenv inside it)
LIBRARIES = ("numpy", "PIL.Image", "tqdm", "torch", "torch.nn.functional", "torch.distributed", "torchvision",
             "torchvision.io", "torchvision.utils", "matplotlib", "matplotlib.figure")
_servers = {}                    # library environment -> Popen of its server


def fresh(argv, cwd, env, timeout):
    """The command in a new interpreter: subprocess.run, output captured as text."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run(argv, cwd, env, timeout) -> subprocess.CompletedProcess:
    """`python *argv` in cwd with environment env (argv[0] a script), through a server."""
    env = {k: str(v) for k, v in env.items()}
    server = _server(env)
    request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "timeout": timeout}
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the command-line server stopped (exit status {server.wait()})")
    reply = json.loads(line)
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired([sys.executable, *request["argv"]], timeout, reply["stdout"], reply["stderr"])
    return subprocess.CompletedProcess([sys.executable, *request["argv"]], reply["returncode"], reply["stdout"],
                                       reply["stderr"])


def _library_environment(env: dict) -> frozenset:
    return frozenset((k, v) for k, v in env.items() if not k.startswith(("FAIRDIFF_", "PYTEST_")))


def _server(env: dict) -> subprocess.Popen:
    key = _library_environment(env)
    server = _servers.get(key)
    if server is None or server.poll() is not None:
        server = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=REPO, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _servers[key] = server
    return server


@atexit.register
def _stop_servers():
    for server in _servers.values():
        if server.poll() is None:
            server.stdin.close()                 # the server ends at the end of its input
            server.wait(timeout=30)


# ------------------------------------------------------------------------------------------ server
def _captured(fds, action) -> list:
    """action() with file descriptors fds pointed at temporary files: -> what was written to each."""
    files, saved = [tempfile.TemporaryFile() for _ in fds], [os.dup(fd) for fd in fds]
    for fd, f in zip(fds, files):
        os.dup2(f.fileno(), fd)
    try:
        action()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read().decode(errors="backslashreplace"))
        f.close()
    return texts


def _import_libraries():
    import importlib
    for name in LIBRARIES:
        importlib.import_module(name)


def _exit_status(code) -> int:
    """The interpreter's exit status for SystemExit(code), printing a non-integer code as it does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(request: dict, out: str, err: str, protocol: int):
    """Become `python *argv` (in the forked child): never returns."""
    status = 1
    try:
        os.close(protocol)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        encoding = sys.stdout.encoding
        sys.stdin = open(0, encoding=encoding, closefd=False)
        sys.stdout = open(1, "w", encoding=encoding, closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)
        script, *_ = sys.argv = request["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if name != "__main__" and path and Path(path).resolve().parent in OWN_FOLDERS:
                del sys.modules[name]
        import runpy
        try:
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as e:
            status = _exit_status(e.code)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            status = 1
        atexit._run_exitfuncs()                  # the libraries' and the script's, as at a normal exit
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _wait(pid: int, timeout: float):
    """-> (exit status as Popen.returncode gives it, whether it was killed for running past timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), True
        time.sleep(0.005)


def serve():
    protocol = os.dup(1)                         # replies; fd 1 itself goes on to what the libraries print
    import_out, import_err = _captured((1, 2), _import_libraries)
    os.dup2(2, 1)
    replies = open(protocol, "w", closefd=False)
    for line in sys.stdin:
        request = json.loads(line)
        tmp = tempfile.mkdtemp()                 # not TemporaryDirectory: a child's exit would remove it
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out, err):
            open(path, "w").close()
        pid = os.fork()
        if pid == 0:
            _child(request, out, err, protocol)
        returncode, timed_out = _wait(pid, request["timeout"])
        reply = {"returncode": returncode, "timed_out": timed_out,
                 "stdout": import_out + Path(out).read_text(errors="backslashreplace"),
                 "stderr": import_err + Path(err).read_text(errors="backslashreplace")}
        shutil.rmtree(tmp)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
