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


def test_the_configs_built_in_names_are_what_the_import_registers():
    """The launcher checks names against config's lists without importing the algorithms; a
    built-in added to (or dropped from) algos without them would be refused (or let through)."""
    from async_pmd.config import BUILT_IN_ADV_ESTIMATORS, BUILT_IN_POLICY_LOSSES

    assert algos.list_adv_estimators() == sorted(BUILT_IN_ADV_ESTIMATORS)
    assert algos.list_policy_losses() == sorted(BUILT_IN_POLICY_LOSSES)


def test_preflight_takes_a_user_registered_name_and_refuses_an_unknown_one(scratch_name):
    from async_pmd.config import ConfigError, build_config
    from async_pmd.preflight import check_runnable

    overrides = [f"algorithm.adv_estimator={scratch_name}"]
    with pytest.raises(ConfigError, match=f"algorithm.adv_estimator: unknown '{scratch_name}'"):
        check_runnable(build_config({}, overrides))
    algos.register_adv_est(scratch_name)(lambda *a, **k: None)
    check_runnable(build_config({}, overrides))
