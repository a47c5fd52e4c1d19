"""Rules for the tests that need the real data root ($FAIRDIFF_DATA: MNIST/raw, celeba/).

Those tests skip when the data is absent, which is right on a laptop, but would let CI pass without
testing anything real. So:

* with CI=true, an unset FAIRDIFF_DATA, or one that is not a folder, stops the test run at once
  (exit status 4), and a test skipped because the data is missing fails the run;
* every run ends with one line saying how many real-data tests and notebook tests ran.

A test counts as a real-data test when, in this process, it opens a file under $FAIRDIFF_DATA (seen
by an audit hook on Python's `open` events) or when it is skipped with a reason that names
FAIRDIFF_DATA. A test that reads the data only in a subprocess is not seen: the notebook execution
tests are, and they are counted among the notebook tests (those of test_notebooks.py).

The notebooks' execution (test_notebooks.py) starts in the background as soon as collection has selected
a test that needs it, so that its minutes in the notebooks' kernels overlap with the other tests.
"""
import os
import sys

import pytest

REAL_ROOT = os.environ.get("FAIRDIFF_DATA", "")
IN_CI = os.environ.get("CI", "").lower() == "true"
_running = {"test": None}              # nodeid of the test being run (its fixtures included)
_read_data, _data_skips = set(), set()   # nodeids: opened a file under REAL_ROOT / skipped for want of it
_notebooks = {"ran": 0, "skipped": 0}


@pytest.fixture(autouse=True)
def _restore_runs_folder():
    """config.parse_config writes FAIRDIFF_RUNS; put back what the test found (see the docstring)."""
    before = os.environ.get("FAIRDIFF_RUNS")
    yield
    if before is None:
        os.environ.pop("FAIRDIFF_RUNS", None)
    else:
        os.environ["FAIRDIFF_RUNS"] = before


def _watch_opens(event, args):
    """Audit hook: note the running test when it opens a path under REAL_ROOT."""
    if event == "open" and _running["test"] and isinstance(args[0], (str, os.PathLike)):
        if os.path.abspath(args[0]).startswith(os.path.abspath(REAL_ROOT) + os.sep):
            _read_data.add(_running["test"])


def pytest_configure(config):
    if IN_CI and not os.path.isdir(REAL_ROOT):
        pytest.exit(f"CI=true but FAIRDIFF_DATA ({REAL_ROOT or 'unset'}) is not a folder: point it at the "
                    f"data root (MNIST/raw, celeba/) so the real-data tests run instead of skipping",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    if os.path.isdir(REAL_ROOT):
        sys.addaudithook(_watch_opens)


@pytest.hookimpl(trylast=True)                  # after -k / -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    """The notebooks take minutes, nearly all of it in their own kernel processes, while every test runs on
    one thread: when a selected test needs them executed, start that now (test_notebooks.start_executing),
    so that it overlaps with the tests before it instead of adding to them."""
    if config.option.collectonly:
        return
    for item in items:
        start = getattr(getattr(item, "module", None), "start_executing", None)
        if start and "executed" in getattr(item, "fixturenames", ()):
            start()
            return


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["test"] = item.nodeid
    yield
    _running["test"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped for want of the real data is noted; under CI=true it fails instead."""
    report = (yield).get_result()
    if report.skipped and "FAIRDIFF_DATA" in str(report.longrepr):
        _data_skips.add(report.nodeid)
        if IN_CI:
            report.outcome, report.longrepr = "failed", f"CI=true: skipped for want of the real data ({REAL_ROOT})"


def pytest_runtest_logreport(report):
    if report.nodeid.split("::")[0].endswith("test_notebooks.py") and (report.when == "call" or report.skipped):
        _notebooks["skipped" if report.skipped else "ran"] += 1


def pytest_terminal_summary(terminalreporter):
    where = REAL_ROOT if os.path.isdir(REAL_ROOT) else f"{REAL_ROOT or 'unset'}, not a folder"
    terminalreporter.write_line(
        f"real data (FAIRDIFF_DATA={where}): {len(_read_data - _data_skips)} tests read it, "
        f"{len(_data_skips)} skipped for want of it; notebook tests: {_notebooks['ran']} ran, "
        f"{_notebooks['skipped']} skipped")
    if IN_CI and _data_skips:
        terminalreporter.write_line(f"CI=true: failing the run, {len(_data_skips)} real-data tests skipped: "
                                    + ", ".join(sorted(_data_skips)), red=True)
