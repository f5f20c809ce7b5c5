"""Config contract: the seed's keys under the seed's names, unknown keys refused, errors name the dotted key."""

from pathlib import Path

import pytest

from async_pmd.config import (
    ActorConfig,
    AlgorithmConfig,
    ConfigError,
    build_config,
    canonical_key,
    load_config,
)
from async_pmd.preflight import check_runnable

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_validate():
    """Every config under configs/ that runs on CPU loads as it is."""
    cfg = load_config(REPO / "configs" / "cluster.yaml")
    assert cfg.algorithm.adv_estimator == "ploo"
    assert cfg.actor.policy_loss.loss_mode == "opmd"
    assert cfg.ray.address is None  # a private Ray on 127.0.0.1 (tests/services/test_faults.py)
    longtail = load_config(REPO / "configs" / "longtail.yaml")
    assert longtail.data.task == "longtail" and longtail.generator.partial_rollout.enable


def test_seed_launch_overrides_verbatim():
    """The seed's launch line works on our loader: `+` ignored, actor_rollout_ref.actor.* aliased."""
    cfg = build_config(
        {},
        [
            "algorithm.adv_estimator=rloo",
            "+algorithm.partition_tau=0.01",
            "actor_rollout_ref.actor.policy_loss.loss_mode=opmd",
            "+actor_rollout_ref.actor.policy_loss.pmd_tau=0.01",
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
        ],
    )
    assert cfg.algorithm.adv_estimator == "rloo"
    assert cfg.algorithm.partition_tau == 0.01
    assert cfg.actor.policy_loss.pmd_tau == 0.01
    assert cfg.actor.loss_agg_mode == "seq-mean-token-sum-norm"


def test_seed_numerics_keys_and_defaults():
    """The seed's KL-loss lines load under its spelling; the numerics defaults are verl's / the seed's."""
    cfg = build_config({}, ["actor_rollout_ref.actor.use_kl_loss=false", "actor_rollout_ref.actor.kl_loss_coef=0.001",
                            "actor_rollout_ref.actor.kl_loss_type=low_var_kl"])
    actor, algorithm = cfg.actor, cfg.algorithm
    assert (actor.use_kl_loss, actor.kl_loss_coef, actor.kl_loss_type) == (False, 0.001, "low_var_kl")
    assert (actor.rollout_is, actor.rollout_is_threshold, actor.policy_loss.clip_ratio_c) == (None, 2.0, 3.0)
    assert algorithm.band_filter == "weight"
    cfg = build_config({}, ["actor.rollout_is=sequence", "algorithm.band_filter=drop", "algorithm.adv_estimator=ploo_exact"])
    assert (cfg.actor.rollout_is, cfg.algorithm.band_filter, cfg.algorithm.adv_estimator) == ("sequence", "drop", "ploo_exact")


def test_override_values_are_yaml_typed():
    cfg = build_config({}, ["algorithm.partition_reward_lb=null", "algorithm.partition_reward_ub=0.9",
                            "data.train_files=[a.jsonl, b.jsonl]", "buffer.max_staleness=0"])
    assert cfg.algorithm.partition_reward_lb is None
    assert cfg.algorithm.partition_reward_ub == 0.9
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.buffer.max_staleness == 0


def test_seed_spelling_inside_yaml_tree():
    cfg = build_config({"actor_rollout_ref": {"actor": {"policy_loss": {"pmd_tau": 0.5}}}})
    assert cfg.actor.policy_loss.pmd_tau == 0.5


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["algorithm.partition_tua=1"], "algorithm.partition_tua"),
        (["algorithm.partition_tau=0"], "algorithm.partition_tau"),
        (["actor.policy_loss.pmd_tau=-1"], "actor.policy_loss.pmd_tau"),
        (["actor.loss_agg_mode=token-sum"], "actor.loss_agg_mode"),
        (["generator.n=many"], "generator.n"),
        (["algorithm.partition_reward_lb=0.5", "algorithm.partition_reward_ub=0.5"], "partition_reward_lb"),
        (["algorithm.adv_estimator=nope"], "algorithm.adv_estimator"),
        (["actor.policy_loss.loss_mode=nope"], "actor.policy_loss.loss_mode"),
        (["model.build_tiny=false", "model.path=/nonexistent/model"], "model"),
        (["bogus.key=1"], "bogus"),
        (["actor.policy_loss.clip_ratio_c=1"], "actor.policy_loss.clip_ratio_c"),
        (["actor.kl_loss_type=full"], "actor.kl_loss_type"),
        (["actor.rollout_is=geometric"], "actor.rollout_is"),
        (["actor.rollout_is_threshold=0"], "actor.rollout_is_threshold"),
        (["algorithm.band_filter=both"], "algorithm.band_filter"),
        (["generator.partial_rollout.segment_tokens=0"], "generator.partial_rollout.segment_tokens"),
        (["generator.partial_rollout.enabled=true"], "generator.partial_rollout.enabled"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    """Refused by the config itself or, for names registered at import and the model directory,
    by the launcher's preflight: either way before any actor starts."""
    with pytest.raises(ConfigError) as err:
        check_runnable(build_config({}, overrides))
    assert key in str(err.value)


def test_sglang_without_sglang_installed_says_how():
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    cfg = build_config({}, ["generator.engine=sglang"])  # a valid config, printable anywhere
    with pytest.raises(ConfigError, match=r"generator.engine.*async-pmd\[sglang\]"):
        check_runnable(cfg)


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        build_config({}, ["algorithm.partition_tau"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_sections_constructible_by_keyword():
    """AlgorithmConfig and ActorConfig build from keywords alone; policy_loss also takes a dict."""
    algo = AlgorithmConfig(partition_tau=0.1)
    actor = ActorConfig(policy_loss={"loss_mode": "opmd", "pmd_tau": 0.1})
    assert algo.adv_estimator == "ploo" and actor.policy_loss.pmd_tau == 0.1


def test_canonical_key():
    assert canonical_key("+actor_rollout_ref.actor.policy_loss.pmd_tau") == "actor.policy_loss.pmd_tau"
    assert canonical_key("actor_rollout_ref.rollout.val_kwargs.n") == "generator.val_kwargs.n"
    assert canonical_key("reward_model.reward_kwargs.max_resp_len") == "scorer.max_resp_len"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["actor.loss_agg_mode=token-mean"], "actor.loss_agg_mode"),
        (["weight_sync.interval=3", "buffer.max_staleness=1"], "buffer.max_staleness"),
        (["buffer.capacity_groups=8"], "buffer.capacity_groups"),
        (["generator.partial_rollout.max_segment_staleness=2", "buffer.max_staleness=1"],
         "generator.partial_rollout.max_segment_staleness"),
    ],
)
def test_cross_section_rules_name_the_key(overrides, key):
    """Rules spanning sections fail before the job starts, not at the first learner step."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_runnable(build_config({}, overrides))


def test_seed_spelling_of_reset_and_overlong_keys():
    """The seed's DAPO script lines load verbatim: the optimizer reset frequency, the reward
    manager's overlong buffer (its `log` flag accepted) and max_resp_len."""
    cfg = build_config({}, [
        "+actor_rollout_ref.actor.reset_optimizer_states_freq=5",
        "+reward_model.reward_kwargs.max_resp_len=8",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=true",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=0.5",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.log=false",
    ])
    assert cfg.actor.reset_optimizer_states_freq == 5
    assert cfg.scorer.max_resp_len == 8
    ob = cfg.scorer.overlong_buffer
    assert (ob.enable, ob.len, ob.penalty_factor, ob.log) == (True, 4, 0.5, False)
    assert build_config({}).actor.reset_optimizer_states_freq == 0  # off unless asked, as in the seed


@pytest.mark.parametrize("overrides", [
    ["scorer.overlong_buffer.enable=true"],  # len 0: the penalty would never apply
    ["scorer.overlong_buffer.enable=true", "scorer.overlong_buffer.len=9", "generator.response_length=8"],
])
def test_an_enabled_overlong_buffer_must_fit_the_response(overrides):
    with pytest.raises(ConfigError, match=r"scorer\.overlong_buffer\.len"):
        build_config({}, overrides)


def test_math_configs_validate():
    """configs/math_tiny.yaml loads as it is; configs/gpu_dapo_math.yaml (SGLang, a 7B model on
    disk) holds the seed's DAPO-17k settings under our keys once its engine and model are swapped
    for ones this machine has."""
    tiny = load_config(REPO / "configs" / "math_tiny.yaml")
    assert (tiny.data.task, tiny.scorer.reward_fn) == ("gsm_tiny", "math")
    assert tiny.trainer.test_freq > 0 and tiny.trainer.val_before_train
    gpu = load_config(REPO / "configs" / "gpu_dapo_math.yaml", ["generator.engine=torch", "model.build_tiny=true"])
    assert (gpu.algorithm.adv_estimator, gpu.algorithm.partition_tau, gpu.actor.policy_loss.pmd_tau) == ("rloo", 0.01, 0.01)
    assert (gpu.actor.lr, gpu.data.train_batch_size, gpu.actor.ppo_mini_batch_size, gpu.generator.n) == (1e-6, 512, 32, 16)
    val = gpu.generator.val_kwargs
    assert (gpu.trainer.test_freq, val.n, val.do_sample, val.temperature, val.top_p) == (5, 32, True, 1.0, 0.7)
    assert gpu.trainer.save_freq == 100 and gpu.scorer.max_resp_len == gpu.generator.response_length == 8192


def test_a_config_that_can_never_dispatch_is_refused_naming_the_keys():
    """Requests of 16 prompts for batches of 8 in sync mode: every request spans two learner
    steps, so its later half would always be stale; refused at load, naming the keys."""
    with pytest.raises(ConfigError) as err:
        build_config({}, ["data.train_batch_size=8", "generator.prompts_per_request=16", "buffer.max_staleness=0",
                          "buffer.capacity_groups=64"])
    for key in ("generator.prompts_per_request", "data.train_batch_size", "buffer.max_staleness"):
        assert key in str(err.value)
    build_config({}, ["data.train_batch_size=8", "generator.prompts_per_request=16", "buffer.max_staleness=1",
                      "buffer.capacity_groups=64"])


@pytest.mark.parametrize("overrides, inline", [
    ([], True),  # the demo: synthetic add_mod10, a string comparison
    (["data.task=reverse"], True),
    (["scorer.reward_fn=exact_match"], True),
    (["data.task=gsm_tiny"], False),  # falls back to math-verify (sympy), which can hang
    (["scorer.reward_fn=math"], False),
    (["scorer.reward_fn=tests/data/faulty_reward.py:reward"], False),  # user code: always a worker process
    (["scorer.inline_builtin=false"], False),
])
def test_scorer_scores_inline_only_string_builtins(overrides, inline):
    """`scorer_inline` is the config's decision: pure-string built-ins in the generator replica's
    thread (no scorer deployed), everything else (math, user files) in the scorer's worker
    processes that a hang cannot outlive. With partial rollouts the driver assembles groups, so a
    string built-in is scored inline in the scorer replica instead."""
    cfg = load_config(REPO / "configs" / "cluster.yaml", overrides)
    assert cfg.scorer_inline is inline and cfg.score_in_generator is inline
    partial = load_config(REPO / "configs" / "cluster.yaml", [*overrides, "generator.partial_rollout.enable=true"])
    assert partial.scorer_inline is inline and not partial.score_in_generator


def test_the_launchers_checks_of_the_default_config_import_no_torch():
    """The launcher parses and checks a config before Ray starts; with the built-in names that
    takes no torch import (seconds on the start-up's critical path, README "Start-up")."""
    import subprocess
    import sys

    script = ("import sys; from async_pmd.launch import parse_args; from async_pmd.preflight import check_runnable; "
              "check_runnable(parse_args(['configs/cluster.yaml'])[0]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr[-2000:]
