"""The job state machine: every allowed step, and every other one refused."""

from __future__ import annotations

import itertools

import pytest

from storage.models import TERMINAL_STATES, TRANSITIONS, IllegalTransition, Job, JobState, move

ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"),
    ("running", "running"), ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"),
}


@pytest.mark.parametrize("old,new", list(itertools.product(JobState, JobState)))
def test_only_the_documented_steps_are_allowed(old, new):
    job = Job(id="j_test", state=old.value)
    if (old.value, new.value) in ALLOWED:
        move(job, new)
        assert job.state == new.value
        assert (job.finished_at is not None) == (new.value in TERMINAL_STATES)
    else:
        with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
            move(job, new)
        assert job.state == old.value


def test_final_states_have_no_way_out():
    assert {s for s in JobState if not TRANSITIONS[s]} == {JobState(s) for s in TERMINAL_STATES}
