"""The loop's small units: the non-finite policy (every branch), the per-micro-batch agreement on one process, and
that callbacks come from the config (the loop has no test hooks of its own)."""

import inspect

import pytest
import torch

from sslscale.train.step_policy import Agreement, NonFinitePolicy, TrainingStopped


def test_finite_micro_batches_are_ok_and_not_counted():
    policy = NonFinitePolicy("skip", grad_accum=1)
    assert policy.decide([], step=1, micro=0, have_finite=False) == "ok"
    assert policy.skipped == 0


def test_skip_without_accumulation_skips_the_whole_step():
    policy = NonFinitePolicy("skip", grad_accum=1)
    assert policy.decide([1], step=4, micro=0, have_finite=False) == "skip_step"
    assert policy.decide([0, 1], step=5, micro=0, have_finite=False) == "skip_step"
    assert policy.skipped == 2


def test_skip_with_accumulation_zeroes_the_micro_batch_after_a_finite_one():
    policy = NonFinitePolicy("skip", grad_accum=4)
    assert policy.decide([0], step=2, micro=2, have_finite=True) == "zero_grad"
    assert policy.skipped == 1
    with pytest.raises(TrainingStopped, match="non-finite loss at step 3 before any finite micro-batch"):
        policy.decide([1], step=3, micro=0, have_finite=False)


def test_stop_names_step_micro_batch_and_ranks():
    policy = NonFinitePolicy("stop", grad_accum=2)
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 7 \(micro-batch 1\) on rank\(s\) \[0, 3\]"):
        policy.decide([0, 3], step=7, micro=1, have_finite=True)
    assert policy.skipped == 0


def test_policy_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode 'skip' or 'stop'"):
        NonFinitePolicy("ignore", 1)
    with pytest.raises(ValueError, match="grad_accum >= 1"):
        NonFinitePolicy("skip", 0)


def test_agreement_on_one_process_reports_its_own_state():
    agree = Agreement(1, torch.device("cpu"))
    assert agree(2.5, False, 0) == (2.5, False, [])
    assert agree(float("nan"), True, 0) == (0.0, True, [0])
    assert agree(float("inf"), False, 0)[2] == [0]


def test_the_loop_has_no_test_hooks():
    from sslscale.train import pretrain

    source = inspect.getsource(pretrain)
    assert "SIGKILL" not in source and "SSLSCALE_TEST" not in source and "os.environ" not in source
