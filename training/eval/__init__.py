"""``atop eval``: the robustness evaluation (code map: docs/evaluation.md)."""
