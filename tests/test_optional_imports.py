"""The optional packages stay optional: ``import torchbp`` imports none of them, and an integration whose
framework is missing says which package to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("lightning", "pytorch_lightning", "transformers", "accelerate", "wandb", "matplotlib")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_torchbp_imports_no_optional_package():
    done = run(
        "import sys, torchbp, torchbp.integrations\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules), torchbp.__file__)"
    )
    assert done.returncode == 0, done.stderr
    loaded, path = done.stdout.split("] ")
    assert loaded + "]" == "[]", f"import torchbp imported {loaded}]"
    assert Path(path.strip()).is_relative_to(ROOT), path  # (this checkout's torchbp)


@pytest.mark.parametrize(
    "module, missing, install",
    [
        ("lightning", "lightning", "pip install lightning"),
        ("hf", "transformers", "pip install transformers accelerate"),
    ],
)
def test_an_integration_without_its_package_says_what_to_install(module, missing, install):
    done = run(f"import sys; sys.modules[{missing!r}] = None\nimport torchbp.integrations.{module}")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: torchbp.integrations.{module} needs the {missing} package"), last
    assert install in last and "torchbp[integrations]" in last, last
