"""CI runs what the README says it runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set-up") : readme.index("## Use")]
    after = setup[setup.index("this is what `.ci/run` calls") :]
    command = next(line.strip() for line in after.splitlines()[1:] if line.startswith("    "))
    assert "ruff check ." in command and "mypy" in command and command.endswith("pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in [line.strip() for line in ci]
