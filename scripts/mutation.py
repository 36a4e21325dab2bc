"""Mutation testing of the core modules, each against the tests that cover it; prints JSON.

Each module is mutated by mutmut in a scratch copy of the working tree (mutmut reads its settings
from setup.cfg and writes a mutants/ folder, so the checkout itself is never touched), and each
mutant is run against that module's tests only. Per module: mutants killed, surviving, the score,
and each survivor with the line it changed. Survivors listed in tests/mutation-equivalent.txt
(one mutant name, then why it cannot change behaviour) are reported apart. Run by
scripts/mutation.sh, which installs mutmut first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "dsp", "storage", "scripts")
MODULES = {
    "app/turns.py": ["tests/test_turns.py", "tests/test_turns_actions.py", "tests/test_turns_closing.py",
                     "tests/test_turns_watchdog.py", "tests/test_turns_reconnect.py"],
    "app/playback.py": ["tests/test_playback.py"],
    "app/call.py": ["tests/test_call_wire.py", "tests/test_call_end_to_end.py"],
    "dsp/echo.py": ["tests/test_dsp_echo.py", "tests/test_dsp_echo_rules.py", "tests/test_dsp_canceller.py"],
    "dsp/vad.py": ["tests/test_dsp_vad.py"],
    "app/http.py": ["tests/test_http_routes.py"],
    "storage/writer.py": ["tests/test_storage_writer.py", "tests/test_storage_spill.py"],
    "storage/spill.py": ["tests/test_storage_spill.py"],
    "storage/migrate.py": ["tests/test_storage_migrate.py"],
    # Not the worker-process tests: mutmut runs a mutant against the tests that reached its function in-process.
    "app/whatsapp/dispatch.py": [
        "tests/test_whatsapp_dispatch.py", "tests/test_whatsapp_dispatch_rules.py", "tests/test_whatsapp_sending.py"],
}
EQUIVALENT = REPO / "tests" / "mutation-equivalent.txt"
TEST_TIMEOUT_S = 30
"""A test of a mutant running this long hangs (the slowest test takes some 6 s): it fails, and the mutant is killed.
Without it a mutant that spins a mock clock for ever runs into mutmut's own limit, 30 times its tests' time."""


def equivalent_mutants() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour, from tests/mutation-equivalent.txt."""
    if not EQUIVALENT.exists():
        return {}
    entries = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition(" ")
            entries[name] = why.strip()
    return entries


def copy_working_tree(destination: Path) -> None:
    """The files git tracks or would track (uncommitted edits included), without the virtualenv."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def mutmut_settings(module: str, tests: list[str]) -> str:
    package = module.split("/", 1)[0]
    lines = ["", "[mutmut]", f"source_paths = {package}", f"only_mutate = {module}", "also_copy ="]
    lines += [f"    {other}" for other in PACKAGES if other != package]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {test}" for test in tests]
    # The thread method ends the test process, where a signal cannot interrupt a hung trio loop cleanly.
    lines += ["pytest_add_cli_args =", f"    --timeout={TEST_TIMEOUT_S}", "    --timeout-method=thread",
              "    -p", "    scripts.mutation_order"]
    return "\n".join(lines) + "\n"


def changed_line(mutmut: str, work: Path, mutant: str) -> str:
    """The mutant's edit as 'old -> new', from `mutmut show`."""
    diff = subprocess.run([mutmut, "show", mutant], cwd=work, capture_output=True, text=True).stdout.splitlines()
    removed = next((line[1:].strip() for line in diff if line.startswith("-") and not line.startswith("---")), "")
    added = next((line[1:].strip() for line in diff if line.startswith("+") and not line.startswith("+++")), "")
    return f"{removed} -> {added}"


def mutate(module: str, tests: list[str], mutmut: str, scratch: Path, processes: int) -> dict:
    work = scratch / module.replace("/", "_")
    copy_working_tree(work)
    with open(work / "setup.cfg", "a") as config:
        config.write(mutmut_settings(module, tests))
    started = time.perf_counter()
    run = subprocess.run([mutmut, "run", "--max-children", str(processes)], cwd=work, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": f"mutmut run exited {run.returncode}: {run.stderr.strip()[-500:]}"}
    subprocess.run([mutmut, "export-cicd-stats"], cwd=work, check=True, capture_output=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    results = subprocess.run([mutmut, "results"], cwd=work, check=True, capture_output=True, text=True).stdout
    surviving = [line.split(":")[0].strip() for line in results.splitlines() if line.strip().endswith(": survived")]
    equivalent = equivalent_mutants()
    killed = stats["killed"] + stats["timeout"] + stats["segfault"]
    return {
        "tests": tests,
        "mutants": stats["total"],
        "killed": killed,
        "score": round(killed / max(1, stats["total"]), 3),
        "score_counting_equivalent": round(
            (killed + sum(name in equivalent for name in surviving)) / max(1, stats["total"]), 3),
        "not_covered": stats["no_tests"],
        "surviving": {name: changed_line(mutmut, work, name) for name in surviving if name not in equivalent},
        # The edit beside the reason: a listed name points at another edit once its function changes.
        "equivalent": {name: {"edit": changed_line(mutmut, work, name), "why": equivalent[name]}
                       for name in surviving if name in equivalent},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    arguments = parser.parse_args()
    unknown = set(arguments.modules) - set(MODULES)
    if unknown:
        parser.error(f"not a module this script knows: {', '.join(sorted(unknown))}")
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if mutmut is None:
        parser.error("mutmut is not installed: run scripts/mutation.sh, which installs it")
    if importlib.util.find_spec("pytest_timeout") is None:
        parser.error("pytest-timeout is not installed: run scripts/mutation.sh, which installs it")
    if not os.environ.get("CALLGATE_TEST_PG_URL"):
        print("CALLGATE_TEST_PG_URL is not set: the PostgreSQL cases skip, so the mutants only they kill survive",
              file=sys.stderr)
    report = {}
    with tempfile.TemporaryDirectory(prefix="callgate-mutation-") as scratch:
        for module in arguments.modules or MODULES:
            report[module] = mutate(module, MODULES[module], mutmut, Path(scratch), arguments.processes)
            print(f"{module}: {report[module].get('score', report[module].get('error'))}", file=sys.stderr)
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
