"""The job: start Ray, deploy the services, run the learner loop, keep the run's records.

It lives outside `async_pmd/` because it imports Ray Serve (the library never does) and outside
`services/` because it is not an actor: it is the driver process that owns them.

    cluster.py   start or join Ray (listeners on 127.0.0.1 for a private one)
    deploy.py    build the actors in dependency order, restore them from a checkpoint, stop them
    loop.py      `Trainer`: setup → train (take → train → publish → log → checkpoint) → cleanup
    record.py    the run record: accounting and fault counters (pure), metrics.jsonl, progress line
    validate.py  validation through the running Generator and RewardScorer deployments
    restart.py   the learner-restart policy (roll everything back to the last checkpoint)
    scaling.py   change a running job's replica counts in place (`python -m async_pmd.scale`)
    loopback.py  the Ray worker hook that keeps Serve's replica gRPC server on the node IP (127.0.0.1 here)
"""
