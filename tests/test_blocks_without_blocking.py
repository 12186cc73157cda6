"""The token-blocks tests can fail: with blocking turned off underneath them (planned and reported as before, every
call run whole), each test of tests/test_blocks.py that trains with token blocks fails."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: every test that trains with token blocks (the first five compared plain with "blocked" and passed without blocking)
MUST_FAIL = (
    "test_shift_labels",
    "test_moe_router_logits_and_auxiliary_loss",
    "test_quantized_model",
    "test_blocked_step_equals_plain",
    "test_trained_head",
    "test_auto_blocks_only_calls_longer_than_a_block",
    "test_outputs_without_labels_or_in_eval_mode_are_unchanged",
    "test_mlp_blocks_of_their_own_size",
    "test_mlp_calls_up_to_the_hidden_width_run_whole_where_the_backend_says",
)


def test_blocks_tests_fail_when_blocking_is_off(tmp_path):
    report = tmp_path / "report.xml"
    environment = {**os.environ, "PORTABLE_KBIT_TEST_BLOCKING_OFF": "1"}
    selection = " or ".join(MUST_FAIL)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_blocks.py")]
    command += ["-k", selection, f"--junitxml={report}"]
    subprocess.run(command, env=environment, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes: dict[str, list[bool]] = {}
    for case in cases:
        name = case.get("name", "").split("[")[0]
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes.setdefault(name, []).append(failed)
    assert set(outcomes) == set(MUST_FAIL), sorted(outcomes)
    passed = [name for name, failures in outcomes.items() if not all(failures)]
    assert not passed, f"these tests pass with blocking off: {passed}"
