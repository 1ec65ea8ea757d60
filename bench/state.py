"""A run directory's ``state.json``: MLflow run id, status, evaluated budgets, budget figures.

Written atomically (temporary file + ``os.replace``). A file cut short by a crash reads as empty:
the checkpoint and MLflow are the truth, and the next start rebuilds the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE = "state.json"


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)
