"""async-pmd: asynchronous actor-model RL post-training with Policy Mirror Descent.

The library of pure parts (config, wire format, algorithms, engines, data, rewards, models); the
long-lived actors that run them live in `services/`, and nothing here imports Ray Serve.
"""

__version__ = "0.1.0"
