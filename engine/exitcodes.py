"""Exit statuses of the `latentstage` commands (the supervisor reads them too)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_MODEL_ERROR = 3
EXIT_BRIDGE_UNAVAILABLE = 4
EXIT_BACKEND_UNAVAILABLE = 5
EXIT_START_CHECK = 6
EXIT_SUPERVISOR_GAVE_UP = 7

START_FAILURES = {
    EXIT_CONFIG_ERROR: "configuration error",
    EXIT_MODEL_ERROR: "model error",
    EXIT_BRIDGE_UNAVAILABLE: "bridge unavailable",
    EXIT_BACKEND_UNAVAILABLE: "backend unavailable",
    EXIT_START_CHECK: "start check failed",
}
"""Exit statuses of `latentstage run` that a restart cannot mend (the setup must change)."""
