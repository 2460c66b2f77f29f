"""`make test` runs two test processes at once (docs/decisions.md "Two test processes"): no test may reach
or stop another's Ray. A bare `ray.init()` joins the cluster of the last `ray start` on the machine (another
test's), and `ray stop` kills every Ray instance of the user; both are refused here, in the tests' own text."""
import re
from pathlib import Path

TESTS = Path(__file__).parent


def calls(pattern: str) -> list[str]:
    found = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                found.append(f"{path.name}:{number}: {line.strip()}")
    return found


def test_every_ray_init_in_the_tests_starts_its_own_instance():
    inits = calls(r"\bray\.init\(")
    assert inits, "the pattern must find the tests' ray.init calls"
    assert [c for c in inits if 'address="local"' not in c] == []


def test_no_test_runs_ray_stop():
    # `ray stop` as a command: "stop" as one argument of a command list (RAY, "stop"), or in a shell string
    assert calls(r"""["']stop["']|["']ray stop""") == []
