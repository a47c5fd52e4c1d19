"""tests/cli.py runs a command line as a new interpreter runs it: the same exit status, stdout and stderr
for a bad flag of each of the five command lines (the one real start-up of each in the suite), for a
script that reads its environment, argv, working folder and stdin, for SystemExit with a message and for
an uncaught exception; and it stops a command that runs past its timeout."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402  (tests/cli.py)

FIRST_FLAGS = [  # one bad flag of each command line, refused before anything is read or written
    ["ddpm.py", "--preset", "tiny", "--device", "cpu", "--channels", "16,x"],
    ["vae.py", "--preset", "tiny", "--device", "cpu", "--latent-channels", "0"],
    ["ddm.py", "--preset", "tiny", "--device", "cpu", "--alphas", "0,2"],
    ["invdiff.py", "--preset", "tiny", "--device", "cpu", "--lam", "-1"],
    ["evaluate.py", "--run", "no-such-run", "--device", "cpu"],
]


def environment(tmp_path):
    return {**os.environ, "FAIRDIFF_DATA": str(tmp_path / "data"), "FAIRDIFF_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("argv", FIRST_FLAGS, ids=[a[0] for a in FIRST_FLAGS])
def test_a_bad_flag_gives_what_a_new_interpreter_gives(argv, tmp_path):
    args = [*argv, "--runs", str(tmp_path / "runs")] if argv[0] != "evaluate.py" else argv
    new, served = (run(args, cwd=REPO, env=environment(tmp_path), timeout=120) for run in (cli.fresh, cli.run))
    assert (served.returncode, served.stdout, served.stderr) == (new.returncode, new.stdout, new.stderr)
    assert new.returncode == 2 and len(new.stderr.splitlines()) == 1 and new.stderr.startswith("error: "), new.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_script_sees_its_environment_argv_folder_and_stdin(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print(sys.argv, os.getcwd(), sys.path[0], repr(sys.stdin.read()), __name__)
        print(os.environ.get("FAIRDIFF_PROBE"), os.environ.get("FAIRDIFF_RUNS"))
        print("to stderr", file=sys.stderr)
        sys.exit(3)
    """))
    (tmp_path / "work").mkdir()
    env = {**environment(tmp_path), "FAIRDIFF_PROBE": "first", "FAIRDIFF_RUNS": "here"}
    new, served = (run([script, "a b", "--c"], cwd=tmp_path / "work", env=env, timeout=120)
                   for run in (cli.fresh, cli.run))
    assert (served.returncode, served.stdout, served.stderr) == (new.returncode, new.stdout, new.stderr)
    assert new.returncode == 3 and new.stderr == "to stderr\n" and new.stdout.endswith("__main__\nfirst here\n")
    again = cli.run([script], cwd=tmp_path / "work", env=environment(tmp_path), timeout=120)
    assert again.stdout.splitlines()[1] == "None None"          # nothing left of the first command's environment


@pytest.mark.parametrize("ending, status", [("sys.exit('stopped here')", 1), ("raise KeyError('boom')", 1),
                                            ("sys.exit()", 0)])
def test_exits_and_exceptions_end_as_in_a_new_interpreter(ending, status, tmp_path):
    script = tmp_path / "ending.py"
    script.write_text(f"import sys\nprint('before')\n{ending}\n")
    new, served = (run([script], cwd=tmp_path, env=environment(tmp_path), timeout=120)
                   for run in (cli.fresh, cli.run))
    assert served.returncode == new.returncode == status and served.stdout == new.stdout == "before\n"
    assert served.stderr.splitlines()[-1:] == new.stderr.splitlines()[-1:]    # a traceback's last line
    assert ("Traceback" in served.stderr) == ("Traceback" in new.stderr)


def test_a_command_past_its_timeout_is_stopped(tmp_path):
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "quick.py").write_text("print('served')\n")
    with pytest.raises(subprocess.TimeoutExpired):
        cli.run([tmp_path / "slow.py"], cwd=tmp_path, env=environment(tmp_path), timeout=1)
    assert cli.run([tmp_path / "quick.py"], cwd=tmp_path, env=environment(tmp_path), timeout=60).stdout == "served\n"
