"""Prefect flows of the pipeline.

Importing this package sets two Prefect defaults before Prefect reads its settings, so
every entry point (the CLIs, `deployments.serve`, tests) behaves the same. The user's
own environment still wins.
"""

import os

# Prefect's server sends usage telemetry to an outside host by default; this pipeline
# keeps all traffic on the target it deploys to.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The first start of the ephemeral server creates its database, which can take longer
# than Prefect's 20 s default on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
