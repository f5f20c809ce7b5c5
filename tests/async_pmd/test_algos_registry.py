"""The estimator / policy-loss registries: lookup by name, plug-ins, and clashes."""

import pytest

import async_pmd.algos as algos
from async_pmd.algos import registry


@pytest.fixture
def scratch_name():
    """A registry name that is removed again after the test, so tests do not leak registrations."""
    name = "test-only-estimator"
    yield name
    registry._ADV_ESTIMATORS.pop(name, None)
    registry._POLICY_LOSSES.pop(name, None)


def test_user_plugs_in_an_estimator_by_name(scratch_name):
    """register_adv_est(name) makes fn resolvable by name and listed; same fn twice is a no-op."""

    @algos.register_adv_est(scratch_name)
    def constant(token_level_rewards, response_mask, index, config=None):
        return response_mask, response_mask

    assert algos.get_adv_estimator_fn(scratch_name) is constant
    assert scratch_name in algos.list_adv_estimators() and scratch_name in algos.ADV_ESTIMATORS
    algos.register_adv_est(scratch_name)(constant)  # idempotent


def test_registering_a_different_function_under_a_taken_name_fails(scratch_name):
    """Re-registering a name with a different function raises ValueError (both tables)."""
    algos.register_policy_loss(scratch_name)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        algos.register_adv_est("ploo")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        algos.register_policy_loss(scratch_name)(print)


def test_unknown_names_list_the_known_ones():
    """get_*_fn on an unknown name raises ValueError naming the registered names."""
    with pytest.raises(ValueError, match=r"'ploo'.*'rloo'"):
        algos.get_adv_estimator_fn("nope")
    with pytest.raises(ValueError, match=r"'opmd'.*'vanilla'"):
        algos.get_policy_loss_fn("nope")
    assert {"ploo", "rloo", "partition", "grpo"} <= set(algos.list_adv_estimators())
    assert {"opmd", "vanilla"} <= set(algos.list_policy_losses())
