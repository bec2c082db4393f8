"""The learning-rate policies against PyTorch's schedulers, per iteration.

`torch.optim.lr_scheduler.CyclicLR` and `OneCycleLR` are the references
users compare with: the schedules (`CyclicalLearningRate`,
`OneCycleLearningRate`) and the callbacks (`CyclicLR`, `OneCycle`) must give
the same learning rate and momentum at every iteration. For the callbacks
the comparison is with what the optimizer applied: the probe's weight after
each step equals Keras SGD with momentum run on PyTorch's rates and momenta
(the two libraries write the momentum step differently, so the weights are
compared with a NumPy trajectory, not with PyTorch's weights).
"""

import keras
import numpy as np
import pytest
from keras import ops
from lr_policy_checks import BatchRecorder
from lr_policy_checks import assert_momentum_policy_applied
from lr_policy_checks import fit_probe
from lr_policy_checks import probe_model

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import OneCycle
from keras_regkit.schedules import CyclicalLearningRate
from keras_regkit.schedules import OneCycleLearningRate

torch = pytest.importorskip("torch")


def torch_trace(make_scheduler, iterations):
    """PyTorch's learning rate and momentum used at each of `iterations`."""
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    rates, momenta = [], []
    for _ in range(iterations):
        group = optimizer.param_groups[0]
        rates.append(group["lr"])
        momenta.append(group["momentum"])
        parameter.grad = torch.ones(())
        optimizer.step()
        scheduler.step()
    return np.array(rates), np.array(momenta)


def _scale_by_cycle(cycle):
    return 1.0 / (1.0 + 0.5 * (cycle - 1.0))


def _scale_by_iteration(iteration):
    return 1.0 / (1.0 + 0.05 * iteration)


CYCLIC_CASES = {
    "triangular": {"mode": "triangular"},
    "triangular2": {"mode": "triangular2"},
    "exp_range": {"mode": "exp_range", "gamma": 0.97},
    "scale_fn_of_cycle": {"scale_fn": _scale_by_cycle, "scale_mode": "cycle"},
    "scale_fn_of_iterations": {
        "scale_fn": _scale_by_iteration,
        "scale_mode": "iterations",
    },
}


def _torch_cyclic(kwargs, iterations, step_size=4):
    return torch_trace(
        lambda optimizer: torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=0.01,
            max_lr=0.2,
            step_size_up=step_size,
            base_momentum=0.8,
            max_momentum=0.95,
            **kwargs,
        ),
        iterations,
    )


@pytest.mark.parametrize("case", sorted(CYCLIC_CASES))
def test_cyclical_schedule_equals_torch(case):
    kwargs = CYCLIC_CASES[case]
    rates, _ = _torch_cyclic(kwargs, 40)
    schedule = CyclicalLearningRate(0.01, 0.2, 4, **kwargs)
    python = [schedule.python_value(step) for step in range(40)]
    np.testing.assert_allclose(python, rates, rtol=1e-12)
    # Inside the step: float32.
    values = ops.convert_to_numpy(schedule(np.arange(40)))
    np.testing.assert_allclose(values, rates, rtol=1e-6)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("triangular", marks=pytest.mark.slow),
        pytest.param("triangular2", marks=pytest.mark.slow),
        "exp_range",
    ],
)
def test_cyclic_lr_callback_applies_torch_rates_and_momenta(case):
    kwargs = CYCLIC_CASES[case]
    rates, momenta = _torch_cyclic(kwargs, 30)
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    callback = CyclicLR(
        0.01, 0.2, 4, base_momentum=0.8, max_momentum=0.95, **kwargs
    )
    recorder = BatchRecorder(
        keys=("learning_rate", "momentum"), policy=callback
    )
    fit_probe(model, 6, 5, [callback, recorder])
    assert_momentum_policy_applied(recorder, rates, momenta, rtol=1e-5)


ONE_CYCLE_CASES = {
    "torch_defaults": {"pct_start": 0.3, "anneal_strategy": "cos"},
    "linear_two_phases": {"pct_start": 0.3, "anneal_strategy": "linear"},
    "cos_three_phases": {
        "pct_start": 0.25,
        "anneal_strategy": "cos",
        "three_phase": True,
        "div_factor": 10.0,
        "final_div_factor": 100.0,
    },
    "paper_linear_three_phases": {
        "pct_start": 0.45,
        "anneal_strategy": "linear",
        "three_phase": True,
    },
}


def _torch_one_cycle(kwargs, total_steps):
    return torch_trace(
        lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=0.2,
            total_steps=total_steps,
            base_momentum=0.85,
            max_momentum=0.95,
            **kwargs,
        ),
        total_steps,
    )


def _ours(kwargs):
    return {"three_phase": False, **kwargs}


@pytest.mark.parametrize("case", sorted(ONE_CYCLE_CASES))
@pytest.mark.parametrize("total_steps", [40, 37])
def test_one_cycle_schedule_equals_torch(case, total_steps):
    kwargs = ONE_CYCLE_CASES[case]
    rates, _ = _torch_one_cycle(kwargs, total_steps)
    schedule = OneCycleLearningRate(0.2, total_steps, **_ours(kwargs))
    python = [schedule.python_value(step) for step in range(total_steps)]
    np.testing.assert_allclose(python, rates, rtol=1e-12, atol=1e-15)
    values = ops.convert_to_numpy(schedule(np.arange(total_steps)))
    np.testing.assert_allclose(values, rates, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "case",
    [
        "torch_defaults",
        pytest.param("cos_three_phases", marks=pytest.mark.slow),
    ],
)
def test_one_cycle_callback_applies_torch_rates_and_momenta(case):
    kwargs = ONE_CYCLE_CASES[case]
    rates, momenta = _torch_one_cycle(kwargs, 30)
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    callback = OneCycle(0.2, **_ours(kwargs))  # total_steps from fit: 30
    recorder = BatchRecorder(
        keys=("learning_rate", "momentum"), policy=callback
    )
    fit_probe(model, 6, 5, [callback, recorder])
    assert_momentum_policy_applied(recorder, rates, momenta, rtol=1e-5)


def test_one_cycle_past_total_steps_raises_as_torch_does():
    # PyTorch raises when stepped past total_steps (after using an
    # extrapolated rate once); OneCycle refuses the step past the cycle.
    with pytest.raises(ValueError, match="Tried to step 11 times. The speci"):
        torch_trace(
            lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=0.2, total_steps=10
            ),
            11,
        )
    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    with pytest.raises(
        ValueError,
        match=r"OneCycle reached iteration 10, past the end of its cycle "
        r"\(total_steps=10 covers iterations 0 to 9\)",
    ):
        fit_probe(
            model,
            4,
            3,
            [
                OneCycle(0.2, 10, base_momentum=None, max_momentum=None),
                recorder,
            ],
        )
    # It trained the whole cycle, and no step past it.
    assert int(model.optimizer.iterations) == 10
