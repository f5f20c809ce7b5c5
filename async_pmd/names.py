"""The names the job's actors are found by: Ray actor names, Serve apps and deployments.

One place, so a service, the job and the tools (`async_pmd.scale`) never spell them by hand.
Named actors live in the job's namespace (`ray.namespace`); Serve apps in Serve's own.
"""

DRIVER = "rollout_driver"
"""The RolloutDriver actor."""
BUFFER = "group_buffer"
"""The GroupBuffer actor."""
WEIGHT_STORE = "weight_store"
"""The WeightStore actor."""

GENERATOR_APP, GENERATOR_DEPLOYMENT = "generator", "Generator"
"""The Serve app and deployment of the Generator replicas."""
SCORER_APP, SCORER_DEPLOYMENT = "scorer", "RewardScorer"
"""The Serve app and deployment of the RewardScorer replicas."""
