"""pytest plugin of the GPU check (gpu.sh loads it with -p): every failure is printed, with its
short traceback, the moment it happens, so that a test phase killed at its time limit still shows
what failed before; each test runs under a limit of its own ($GPU_CHECK_TEST_LIMIT seconds, by
SIGALRM), so that one hung case cannot take the phase; and the inductor cases (cold compiles, the
slowest) run last, so that a phase cut short loses them rather than the others."""
import os

import pytest

from time_limit import time_limit

LIMIT = float(os.environ.get("GPU_CHECK_TEST_LIMIT", "0"))
_config = []


class TestTimeLimit(Exception):
    pass


def pytest_configure(config):
    _config.append(config)  # its terminal reporter may not be registered yet


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: "inductor" in item.name)  # a stable sort: the others keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if LIMIT <= 0:
        yield
        return
    with time_limit(LIMIT, TestTimeLimit(f"{item.nodeid} ran past its {LIMIT:.0f} s limit")):
        yield


def pytest_runtest_logreport(report):
    tr = _config[0].pluginmanager.get_plugin("terminalreporter") if _config else None
    if report.failed and tr is not None:
        tr.ensure_newline()
        tr.write_line(f"----- {report.nodeid} failed ({report.when}):", red=True, bold=True)
        for line in report.longreprtext.splitlines()[-40:]:
            tr.write_line(line)
        tr.write_line("-----")
